"""Synthetic data must be *valid*, not just plausible: the detectors check exactly these properties."""

from __future__ import annotations

import datetime as dt
import random
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stdnum import luhn
from stdnum.cn import ric
from stdnum.cn import uscc as stdnum_uscc

from guard.classify.detectors import detect_column, detect_value, uscc_valid
from guard.workload import synth

COLUMNS = {
    "customers": {
        "customer_id", "name", "id_number", "mobile", "email", "address", "gender", "birth_date",
        "occupation", "risk_level", "branch_code",
    },
    "accounts": {
        "account_no", "customer_id", "card_no", "account_type", "balance", "currency", "status",
        "branch_code", "opened_at",
    },
    "transactions": {
        "account_no", "customer_id", "amount", "direction", "counterparty_name", "counterparty_account",
        "channel", "memo", "created_at",
    },
    "customer_auth": {"customer_id", "login_name", "password_hash", "query_pin", "updated_at"},
}


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, object]]]:
    return synth.demo_dataset(seed=20240630, customers=300)


def test_tables_and_exact_columns(data: dict[str, list[dict[str, object]]]) -> None:
    assert set(data) == set(COLUMNS)
    for table, rows in data.items():
        assert rows, table
        for row in rows:
            assert set(row) == COLUMNS[table], table


def test_deterministic_per_seed() -> None:
    assert synth.demo_dataset(7, 40) == synth.demo_dataset(7, 40)
    assert synth.demo_dataset(7, 40) != synth.demo_dataset(8, 40)


def test_customers_consistent_with_their_id(data: dict[str, list[dict[str, object]]]) -> None:
    ids = [c["customer_id"] for c in data["customers"]]
    assert ids == list(range(1, len(ids) + 1))
    for c in data["customers"]:
        idn = str(c["id_number"])
        assert ric.is_valid(idn), "stdnum.cn.ric rejects a synthetic resident ID"
        assert ric.get_birth_date(idn) == c["birth_date"]
        assert c["gender"] == ("M" if int(idn[16]) % 2 else "F")
        assert 1 <= int(c["risk_level"]) <= 5  # type: ignore[call-overload]
        assert c["branch_code"] == "0101"


def test_accounts(data: dict[str, list[dict[str, object]]]) -> None:
    accounts = data["accounts"]
    numbers = [a["account_no"] for a in accounts]
    assert len(numbers) == len(set(numbers)), "account numbers must be unique"
    per_customer: dict[object, int] = {}
    for a in accounts:
        per_customer[a["customer_id"]] = per_customer.get(a["customer_id"], 0) + 1
        card = str(a["card_no"])
        assert luhn.is_valid(card) and len(card) in (16, 19) and card.startswith("62")
        assert not luhn.is_valid(str(a["account_no"])), "account numbers are made to fail Luhn"
        balance = a["balance"]
        assert isinstance(balance, Decimal) and balance.as_tuple().exponent == -2
        assert a["account_type"] in ("savings", "current", "credit")
        assert a["status"] in ("active", "dormant", "frozen")
        assert a["currency"] == "CNY"
        opened = a["opened_at"]
        assert isinstance(opened, dt.datetime) and opened.tzinfo is not None
    assert set(per_customer.values()) <= {1, 2}
    assert len(per_customer) == len(data["customers"])


def test_transactions(data: dict[str, list[dict[str, object]]]) -> None:
    txns = data["transactions"]
    accounts = {a["account_no"]: a for a in data["accounts"]}
    assert 2 <= len(txns) / len(accounts) <= 4
    with_phone = 0
    for t in txns:
        acct = accounts[t["account_no"]]
        assert t["customer_id"] == acct["customer_id"]
        amount = t["amount"]
        assert isinstance(amount, Decimal) and amount > 0 and amount.as_tuple().exponent == -2
        assert t["direction"] in ("D", "C")
        assert t["channel"] in ("counter", "atm", "mobile", "online")
        created = t["created_at"]
        assert isinstance(created, dt.datetime) and created.tzinfo is not None
        assert created >= acct["opened_at"]  # type: ignore[operator]
        if re.search(r"1[3-9]\d{9}", str(t["memo"])):
            with_phone += 1
            det = detect_value(t["memo"])
            assert det is not None and det.kind == "free_text_pii"
    assert with_phone > 0, "some memos must embed a phone number to make free-text PII realistic"


def test_customer_auth(data: dict[str, list[dict[str, object]]]) -> None:
    logins = [a["login_name"] for a in data["customer_auth"]]
    assert len(logins) == len(set(logins))
    for a in data["customer_auth"]:
        assert re.fullmatch(r"\$2b\$12\$[./A-Za-z0-9]{53}", str(a["password_hash"]))
        assert re.fullmatch(r"\d{6}", str(a["query_pin"]))
        assert isinstance(a["updated_at"], dt.datetime) and a["updated_at"].tzinfo is not None


def test_synthetic_values_pass_their_detectors(data: dict[str, list[dict[str, object]]]) -> None:
    expected_kind = {"id_number": "resident_id", "mobile": "mobile", "email": "email", "address": "address"}
    for c in data["customers"]:
        for column, kind in expected_kind.items():
            det = detect_value(c[column])
            assert det is not None and det.kind == kind, column
    for a in data["accounts"]:
        det = detect_value(a["card_no"])
        assert det is not None and det.kind == "bank_card"
    names = [c["name"] for c in data["customers"]]
    det = detect_column("name", names)
    assert det is not None and det.kind == "person_name" and det.confidence >= 0.8
    det = detect_column("holder", names)  # no name hint: the value shape alone must carry it
    assert det is not None and det.kind == "person_name"


@given(st.integers(min_value=0, max_value=2**32))
@settings(max_examples=200, deadline=None)
def test_identifier_generators_are_valid_for_any_seed(seed: int) -> None:
    rng = random.Random(seed)
    idn = synth.resident_id(rng)
    assert ric.is_valid(idn)
    assert luhn.is_valid(synth.bank_card(rng))
    code = synth.uscc(rng)
    assert stdnum_uscc.is_valid(code) and uscc_valid(code)
    assert uscc_valid(synth.uscc(rng, authority="Y"))
    for make, kind in (
        (synth.mobile, "mobile"),
        (synth.landline, "landline"),
        (synth.email, "email"),
        (synth.address, "address"),
        (synth.passport, "passport"),
    ):
        det = detect_value(make(rng))
        assert det is not None and det.kind == kind


@given(
    st.dates(min_value=dt.date(1950, 1, 1), max_value=dt.date(2005, 12, 31)),
    st.sampled_from("MF"),
    st.integers(min_value=0, max_value=2**32),
)
@settings(max_examples=200, deadline=None)
def test_resident_id_honours_birth_and_gender(birth: dt.date, gender: str, seed: int) -> None:
    idn = synth.resident_id(random.Random(seed), birth=birth, gender=gender)
    assert ric.is_valid(idn)
    assert ric.get_birth_date(idn) == birth
    assert (int(idn[16]) % 2 == 1) == (gender == "M")


def test_new_customer_for_workloads() -> None:
    rng = random.Random(1)
    row = synth.new_customer(rng, 10_001)
    assert set(row) == COLUMNS["customers"] and row["customer_id"] == 10_001
    acct = synth.new_account(rng, 10_001)
    assert set(acct) == COLUMNS["accounts"]
    txn = synth.new_transaction(rng, acct)
    assert set(txn) == COLUMNS["transactions"]


def test_names_include_compound_surnames() -> None:
    rng = random.Random(5)
    names = [synth.chinese_name(rng) for _ in range(2000)]
    assert any(n[:2] in ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "慕容", "令狐", "司徒", "夏侯") for n in names)
    assert all(2 <= len(n) <= 4 for n in names)
