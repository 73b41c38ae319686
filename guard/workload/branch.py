"""A branch workload on the demo database: new customers with accounts and transactions, contact-detail
updates, and deletes. Used by `guard demo`, the end-to-end tests and the reliability tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import psycopg

from guard.workload import synth


@dataclass
class WorkloadResult:
    customers: list[int] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    deleted_customers: list[int] = field(default_factory=list)
    deleted_transactions: int = 0
    #: Every sensitive plaintext value the workload wrote (for leak scans).
    sensitive_values: set[str] = field(default_factory=set)
    #: The authentication data it wrote (query PINs, password hashes: C3 in the demo catalog), also in
    #: `sensitive_values`; none of it may reach a raw topic (tests/integration/test_c3_source.py).
    c3_values: set[str] = field(default_factory=set)
    statements: int = 0


#: Who the workload's transactions are attributed to (`guard.principal`, docs/policy.md): a teller opens
#: customers, another teller updates contact details, the manager deletes (policy/branch.cedar).
OPENER = "Staff:t0101-01"
UPDATER = "Staff:t0101-02"
DELETER = "Staff:m0101-01"


def attribute(conn: psycopg.Connection[Any], principal: str | None) -> None:
    """Name the open transaction's principal (the attribution contract; None: leave it unattributed)."""
    if principal is not None:
        conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))


def next_customer_ids(conn: psycopg.Connection[Any], count: int) -> list[int]:
    """Customer ids never used before, from a sequence: an erased customer's id must not come back
    (the guard refuses new writes for an erased data subject, as a bank would never reuse the id)."""
    conn.execute("CREATE SEQUENCE IF NOT EXISTS workload_customer_id START WITH 1000000")
    rows = conn.execute("SELECT nextval('workload_customer_id') FROM generate_series(1, %s)", (count,)).fetchall()
    return [int(r[0]) for r in rows]


def run_workload(dsn: str, *, customers: int = 20, seed: int | None = None, delete: int = 2,
                 update: int = 5, opener: str | None = OPENER, updater: str | None = UPDATER,
                 deleter: str | None = DELETER) -> WorkloadResult:
    """Insert `customers` customers (with accounts and transactions), update some, delete some.

    Each transaction names its principal (`opener`, `updater`, `deleter`; None: unattributed).
    """
    rng = random.Random(seed)
    result = WorkloadResult()
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = next_customer_ids(conn, customers)
        for cid in ids:
            data: Any = synth.demo_dataset(rng.randrange(1 << 30), 1)
            cust = dict(data["customers"][0], customer_id=cid)
            with conn.transaction():
                attribute(conn, opener)
                _insert(conn, "customers", cust)
                renamed: dict[str, str] = {}
                for acct in data["accounts"]:
                    number = f"{acct['account_no']}{cid % 97:02d}"
                    renamed[acct["account_no"]] = number
                    _insert(conn, "accounts", dict(acct, customer_id=cid, account_no=number))
                    result.accounts.append(number)
                    result.sensitive_values.update({number, acct["card_no"]})
                for txn in data["transactions"]:
                    number = renamed.get(txn["account_no"], txn["account_no"])
                    _insert(conn, "transactions", dict(txn, customer_id=cid, account_no=number))
                    result.sensitive_values.update({str(txn["counterparty_name"]), str(txn["counterparty_account"])})
                for auth in data.get("customer_auth", []):
                    _insert(conn, "customer_auth", dict(auth, customer_id=cid))
                    result.sensitive_values.update({str(auth["password_hash"]), str(auth["query_pin"])})
                    result.c3_values.update({str(auth["password_hash"]), str(auth["query_pin"])})
            result.customers.append(cid)
            result.sensitive_values.update(
                str(cust[c]) for c in ("name", "id_number", "mobile", "email", "address")
            )
        for cid in ids[:update]:
            mobile = synth.mobile(rng)
            address = synth.address(rng)
            with conn.transaction():
                attribute(conn, updater)
                conn.execute("UPDATE customers SET mobile = %s, address = %s WHERE customer_id = %s",
                             (mobile, address, cid))
            result.updated.append(cid)
            result.sensitive_values.update({mobile, address})
        for cid in ids[len(ids) - delete:] if delete else []:
            with conn.transaction():
                attribute(conn, deleter)
                cur = conn.execute("DELETE FROM transactions WHERE customer_id = %s", (cid,))
                result.deleted_transactions += cur.rowcount
                conn.execute("DELETE FROM accounts WHERE customer_id = %s", (cid,))
                conn.execute("DELETE FROM customer_auth WHERE customer_id = %s", (cid,))
                conn.execute("DELETE FROM customers WHERE customer_id = %s", (cid,))
            result.deleted_customers.append(cid)
    result.sensitive_values.discard("None")
    return result


def _insert(conn: psycopg.Connection[Any], table: str, row: dict[str, Any]) -> None:
    columns = list(row)
    placeholders = ", ".join(["%s"] * len(columns))
    conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",  # noqa: S608 - fixed names
        [row[c] for c in columns],
    )
