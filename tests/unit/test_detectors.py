"""Content and column-name detectors (domain.md section 3)."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stdnum import luhn
from stdnum.cn import uscc as stdnum_uscc

from guard.classify.detectors import (
    KINDS,
    Detection,
    detect_column,
    detect_value,
    hint_for_column,
    luhn_valid,
    uscc_valid,
)
from guard.protect.masking import MASK_KINDS
from guard.workload import synth


def kind_of(value: object) -> str | None:
    det = detect_value(value)
    return det.kind if det else None


# ---- resident ID ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["11010519491231002X", "440524188001010014", "360426199101010071", "51323120001212169X"]
)
def test_resident_id_reference_vectors(value: str) -> None:
    det = detect_value(value)
    assert det is not None and det.kind == "resident_id" and det.data_class == "C2"
    assert det.mask == "resident_id" and det.confidence >= 0.85


def test_resident_id_variants() -> None:
    assert kind_of("11010519491231002x") == "resident_id"  # lower-case x
    assert kind_of(" 110105 19491231 002X ") == "resident_id"  # separators
    assert kind_of(360426199101010071) == "resident_id"  # int column
    assert kind_of(b"360426199101010071") == "resident_id"  # bytes column
    assert kind_of("110105491231002") == "resident_id"  # legacy 15-digit


def test_resident_id_rejections() -> None:
    assert kind_of("110105194912310021") is None  # wrong check digit
    assert kind_of("990105194912310021") is None  # no such province
    assert kind_of("110105194902300026") is None  # 30 February


def test_resident_id_in_the_future_is_rejected() -> None:
    future = dt.date.today() + dt.timedelta(days=400)
    first17 = f"110105{future:%Y%m%d}001"
    idn = first17 + synth.resident_id_check_char(first17)
    assert kind_of(idn) is None
    past = f"110105{dt.date(2001, 2, 3):%Y%m%d}001"
    assert kind_of(past + synth.resident_id_check_char(past)) == "resident_id"


def test_random_18_digit_strings_mostly_fail_id_check() -> None:
    rng = random.Random(0)
    values = ["".join(rng.choice("0123456789") for _ in range(18)) for _ in range(5000)]
    false_ids = sum(kind_of(v) == "resident_id" for v in values)
    assert false_ids / len(values) < 0.01


# ---- phones -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["13812345678", "138-1234-5678", "138 1234 5678", "+86 138 1234 5678", "008613812345678", 13812345678]
)
def test_mobile_forms(value: object) -> None:
    det = detect_value(value)
    assert det is not None and det.kind == "mobile" and det.mask == "mobile"


@pytest.mark.parametrize("value", ["11111111111", "12012345678", "1381234567", "138123456789"])
def test_not_mobiles(value: str) -> None:
    assert kind_of(value) != "mobile"


@pytest.mark.parametrize("value", ["021-68881234", "0755-8888123", "(010)62345678", "0571 88886666"])
def test_landlines(value: str) -> None:
    assert kind_of(value) == "landline"


# ---- bank cards ---------------------------------------------------------------------------------------


def test_bank_card() -> None:
    det = detect_value("6225881414207430")
    assert det is not None and det.kind == "bank_card" and det.sensitive and det.mask == "bank_card"
    assert kind_of("6225 8814 1420 7430") == "bank_card"
    assert kind_of(6225881414207430) == "bank_card"
    assert kind_of("6225881414207431") is None  # Luhn failure


def test_card_needs_plausible_bin() -> None:
    payload = "100000000000000"
    assert kind_of(payload + synth.luhn_check_digit(payload)) is None


def test_account_numbers_are_not_cards() -> None:
    rng = random.Random(2)
    assert all(kind_of(synth.account_no(rng)) != "bank_card" for _ in range(500))


def test_random_16_digit_strings_mostly_fail_card_check() -> None:
    rng = random.Random(1)
    values = ["".join(rng.choice("0123456789") for _ in range(16)) for _ in range(5000)]
    false_cards = sum(kind_of(v) == "bank_card" for v in values)
    assert false_cards / len(values) < 0.05


@given(st.text(alphabet="0123456789", min_size=2, max_size=30))
@settings(max_examples=500)
def test_luhn_agrees_with_stdnum(digits: str) -> None:
    assert luhn_valid(digits) == luhn.is_valid(digits)


# ---- USCC --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["91110000600037341L", "91350100M000100Y43"])
def test_uscc_reference_vectors(value: str) -> None:
    det = detect_value(value)
    assert det is not None and det.kind == "uscc" and not det.sensitive and det.data_class == "C1"


def test_uscc_with_letter_authority_that_stdnum_rejects() -> None:
    code = synth.uscc(random.Random(3), authority="Y")
    assert not stdnum_uscc.is_valid(code), "python-stdnum is known to reject codes starting with a letter"
    assert uscc_valid(code)
    assert kind_of(code) == "uscc"
    broken = code[:-1] + ("0" if code[-1] != "0" else "1")
    assert not uscc_valid(broken)


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=0, max_value=16), st.integers(0, 30))
@settings(max_examples=300)
def test_uscc_own_check_agrees_with_stdnum_where_stdnum_is_right(seed: int, pos: int, sym: int) -> None:
    code = synth.uscc(random.Random(seed))
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    mutated = code[:pos] + alphabet[sym] + code[pos + 1 :]
    if pos < 8:
        mutated = code[:pos] + str(sym % 10) + code[pos + 1 :]
    assert uscc_valid(mutated) == stdnum_uscc.is_valid(mutated)


# ---- documents, e-mail, IP -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("E12345678", "passport"),
        ("EA1234567", "passport"),
        ("G12345678", "passport"),
        ("C12345678", "permit"),
        ("CA1234567", "permit"),
        ("H1234567801", "permit"),
        ("M12345678", "permit"),
        ("L12345678", "permit"),
    ],
)
def test_documents_are_low_confidence_without_context(value: str, kind: str) -> None:
    det = detect_value(value)
    assert det is not None and det.kind == kind and det.confidence < 0.5


def test_passport_column_name_raises_confidence() -> None:
    det = detect_column("passport_no", ["E12345678", "EA7654321", "E87654321"])
    assert det is not None and det.kind == "passport" and det.confidence >= 0.8


def test_email_and_ipv4() -> None:
    assert kind_of("zhang.san@example.com.cn") == "email"
    assert kind_of("10.0.12.254") == "ipv4"
    assert kind_of("10.0.12.256") is None


# ---- names and addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "word", ["余额", "工资", "房租", "还款", "正常", "冻结", "活期", "利息", "马上", "周末", "黄金", "任务", "谢谢"]
)
def test_ordinary_words_are_not_names(word: str) -> None:
    assert kind_of(word) is None
    det = detect_column("remark", [word] * 20)
    assert det is None or det.kind != "person_name"


def test_names_need_column_name_or_strong_shape() -> None:
    rng = random.Random(4)
    names = [synth.chinese_name(rng) for _ in range(50)]
    det = detect_column("xm", names)
    assert det is not None and det.kind == "person_name" and det.mask == "name"
    det = detect_column("party", names)
    assert det is not None and det.kind == "person_name"
    # A few name-looking values without a name-like column are not enough.
    assert detect_column("party", names[:2]) is None
    words = ["余额", "工资", "还款", "王伟", "利息", "水电费", "奖金"] * 5
    det = detect_column("party", words)
    assert det is None or det.kind != "person_name"


def test_compound_surnames() -> None:
    det = detect_value("欧阳娜娜")
    assert det is not None and det.kind == "person_name"


@pytest.mark.parametrize(
    "value",
    [
        "上海市浦东新区陆家嘴环路1000号12楼",
        "广东省深圳市南山区科技园路1号",
        "北京市朝阳区建国路88号SOHO现代城5号楼1201室",
        "浙江省杭州市西湖区文三路90号",
    ],
)
def test_addresses(value: str) -> None:
    det = detect_value(value)
    assert det is not None and det.kind == "address" and det.category == "location"


@pytest.mark.parametrize("value", ["上海市", "这是一个普通的备注", "区块链技术研讨会", "路过"])
def test_not_addresses(value: str) -> None:
    assert kind_of(value) != "address"


# ---- free text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "转账给13812345678",
        "客户来电 联系电话 +86 138-1234-5678 请回访",
        "身份证号11010519491231002X已核实",
        "退款至卡号6225881414207430",
        "请发送至zhang@qq.com确认",
    ],
)
def test_free_text_finds_embedded_identifiers(text: str) -> None:
    det = detect_value(text)
    assert det is not None and det.kind == "free_text_pii" and det.data_class == "C2"


def test_free_text_without_identifiers() -> None:
    assert detect_value("本月工资已发放，请注意查收，如有疑问请到柜台咨询") is None
    assert detect_value("订单号 20240630 金额 1234.56 元") is None


def test_free_text_mobile_inside_id_is_not_a_phone() -> None:
    det = detect_value("证件11010519491231002X")
    assert det is not None and "mobile" not in det.reason and "resident ID" in det.reason


# ---- non-string values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [None, True, 3.14, 13812345678.0, -13812345678, dt.date.today(), [1, 2], {"a": 1}, b"\xff\xfe\x00"]
)
def test_non_identifier_types(value: object) -> None:
    assert detect_value(value) is None


def test_decimal_integral() -> None:
    assert kind_of(Decimal("13812345678")) == "mobile"
    assert kind_of(Decimal("138.12")) is None


# ---- reasons never contain values ---------------------------------------------------------------------


def _synthetic_values(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        synth.resident_id(rng), synth.mobile(rng), synth.bank_card(rng), synth.email(rng), synth.address(rng),
        synth.landline(rng), synth.uscc(rng), synth.passport(rng), synth.chinese_name(rng),
        f"转账给{synth.mobile(rng)}",
    ]


@given(st.integers(min_value=0, max_value=2**32))
@settings(max_examples=100, deadline=None)
def test_reasons_never_contain_the_value(seed: int) -> None:
    values = _synthetic_values(seed)
    name = values.pop(8)  # names without a name-like column are only found column-wide
    named = detect_column("xm", [name])
    assert named is not None and name not in named.reason
    for value in values:
        det = detect_value(value)
        assert det is not None
        assert value not in det.reason
        digits = "".join(ch for ch in value if ch.isdigit())
        if len(digits) >= 6:
            assert digits not in det.reason
        col = detect_column("col_x", [value] * 6)
        if col is not None:
            assert value not in col.reason


@given(st.text(min_size=6, max_size=40))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_crashes_or_leaks(value: str) -> None:
    det = detect_value(value)
    if det is not None:
        assert det.kind in KINDS
        assert value.strip() not in det.reason
        assert 0.0 <= det.confidence <= 1.0


def test_detection_contract() -> None:
    det = detect_value("13812345678")
    assert isinstance(det, Detection)
    with pytest.raises(AttributeError):
        det.kind = "x"  # type: ignore[misc]
    for value in _synthetic_values(9)[:8]:
        d = detect_value(value)
        assert d is not None
        assert d.mask is None or d.mask in MASK_KINDS
        assert d.data_class in ("C1", "C2", "C3")


# ---- column names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        ("id_no", "resident_id"), ("idcard", "resident_id"), ("zjhm", "resident_id"), ("sfzh", "resident_id"),
        ("cert_no", "resident_id"), ("IdCardNo", "resident_id"),
        ("phone", "mobile"), ("tel", "mobile"), ("mobile", "mobile"), ("sjhm", "mobile"), ("custMobileNo", "mobile"),
        ("card", "bank_card"), ("card_no", "bank_card"), ("acct", "bank_account"), ("account_no", "bank_account"),
        ("addr", "address"), ("dz", "address"), ("home_address", "address"),
        ("name", "person_name"), ("xm", "person_name"), ("hm", "person_name"), ("cust_nm", "person_name"),
        ("passwd", "auth_secret"), ("pwd", "auth_secret"), ("pin", "auth_secret"), ("cvn", "auth_secret"),
        ("cvv", "auth_secret"), ("secret", "auth_secret"), ("token", "auth_secret"), ("query_pin", "auth_secret"),
        ("password_hash", "auth_secret"), ("email", "email"), ("client_ip", "ipv4"), ("login_name", "login_name"),
    ],
)
def test_column_name_hints(column: str, kind: str) -> None:
    assert hint_for_column(column) == kind


@pytest.mark.parametrize(
    "column",
    ["customer_id", "remark2", "ref_code", "note", "branch_name", "card_type", "account_status", "pinyin",
     "shipping", "password_changed_at", "id", "created_at", "product_name"],
)
def test_column_names_without_hint(column: str) -> None:
    assert hint_for_column(column) is None


# ---- detect_column ------------------------------------------------------------------------------------


def test_misleading_column_names() -> None:
    rng = random.Random(6)
    det = detect_column("remark2", [synth.resident_id(rng) for _ in range(30)])
    assert det is not None and det.kind == "resident_id" and det.confidence >= 0.85
    det = detect_column("ref_code", [synth.mobile(rng) for _ in range(30)])
    assert det is not None and det.kind == "mobile"
    det = detect_column("note", [synth.bank_card(rng) for _ in range(30)])
    assert det is not None and det.kind == "bank_card"
    # A column *named* phone that holds resident IDs is an ID column: content with a checksum wins.
    det = detect_column("phone", [synth.resident_id(rng) for _ in range(30)])
    assert det is not None and det.kind == "resident_id"


def test_priority_on_mixed_content() -> None:
    rng = random.Random(7)
    values = [synth.resident_id(rng) for _ in range(10)] + [synth.mobile(rng) for _ in range(10)]
    det = detect_column("c", values)
    assert det is not None and det.kind == "resident_id"
    values = [synth.bank_card(rng) for _ in range(10)] + [synth.mobile(rng) for _ in range(10)]
    det = detect_column("c", values)
    assert det is not None and det.kind == "bank_card"


def test_name_hint_kept_when_values_are_masked() -> None:
    det = detect_column("id_no", ["110***********002X", "440***********0014", None, ""])
    assert det is not None and det.kind == "resident_id" and det.confidence == 0.5
    assert "did not confirm" in det.reason


def test_secret_names_win_regardless_of_content() -> None:
    det = detect_column("query_pin", ["123456", "654321"])
    assert det is not None and det.kind == "auth_secret" and det.data_class == "C3" and det.mask is None
    det = detect_column("pwd", [synth.mobile(random.Random(1))])
    assert det is not None and det.kind == "auth_secret"


def test_memo_column_with_embedded_phones() -> None:
    memos = ["工资", "房租", "还款", "转账给13812345678", "水电费"] * 4
    det = detect_column("memo", memos)
    assert det is not None and det.kind == "free_text_pii"


def test_demo_dataset_columns() -> None:
    data = synth.demo_dataset(3, 60)
    expect = {
        ("customers", "id_number"): "resident_id",
        ("customers", "mobile"): "mobile",
        ("customers", "email"): "email",
        ("customers", "address"): "address",
        ("customers", "name"): "person_name",
        ("accounts", "card_no"): "bank_card",
        ("accounts", "account_no"): "bank_account",
        ("transactions", "counterparty_name"): "person_name",
        ("transactions", "memo"): "free_text_pii",
        ("customer_auth", "password_hash"): "auth_secret",
        ("customer_auth", "query_pin"): "auth_secret",
    }
    for (table, column), kind in expect.items():
        det = detect_column(column, [row[column] for row in data[table]])
        assert det is not None and det.kind == kind, (table, column)
    for column in ("currency", "status", "channel", "direction", "branch_code", "risk_level"):
        table = next(t for t, rows in data.items() if column in rows[0])
        assert detect_column(column, [row[column] for row in data[table]]) is None, column


def test_empty_and_unknown() -> None:
    assert detect_column("whatever", []) is None
    assert detect_column("whatever", [None, "", "   "]) is None
    det = detect_column("mobile", [])
    assert det is not None and det.kind == "mobile" and det.confidence == 0.6


def test_generators_are_consumed_lazily() -> None:
    consumed = 0

    def gen() -> Iterator[str]:
        nonlocal consumed
        for _ in range(1_000_000):
            consumed += 1
            yield "13812345678"

    det = detect_column("x", gen())
    assert det is not None and det.kind == "mobile"
    assert consumed <= 501


def test_account_numbers_confirm_an_account_column_by_shape() -> None:
    rng = random.Random(8)
    det = detect_column("acct_no", [synth.account_no(rng) for _ in range(20)])
    assert det is not None and det.kind == "bank_account" and det.confidence >= 0.85
    assert det.mask == "bank_card" and det.sensitive


def test_all_digit_uscc_is_not_mistaken_for_a_card() -> None:
    rng = random.Random(10)
    codes = [c for c in (synth.uscc(rng) for _ in range(400)) if c.isdigit()]
    assert codes
    assert all(kind_of(c) == "uscc" for c in codes)


@pytest.mark.parametrize("column", ["is_pass", "track_no", "id_expiry", "token_type", "pin_retry_count"])
def test_secret_words_in_other_senses(column: str) -> None:
    assert hint_for_column(column) != "auth_secret"


@pytest.mark.parametrize("column", ["api_key", "card_expiry", "cvv2", "sms_code", "jymm", "loginPassword"])
def test_more_secret_names(column: str) -> None:
    assert hint_for_column(column) == "auth_secret"
