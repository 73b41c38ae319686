"""A branch workload on the demo database: new customers with accounts and transactions, contact-detail
updates, and deletes. Used by `guard demo`, the end-to-end tests and the reliability tests.

One workload for both engines: a ``postgresql://`` DSN runs it on the PostgreSQL branch (psycopg), a
``mysql://`` DSN on the MariaDB branch (PyMySQL, through :class:`MariaConnection`, which offers the few
calls of a psycopg connection the workload uses). On MariaDB the customer's login also gets a binary
device fingerprint (``customer_auth.device_fp``, VARBINARY), a column only that branch's schema has.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from guard.config import mariadb_connect_args
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


class MariaConnection:
    """A PyMySQL connection (autocommit) with the psycopg calls the workload uses: ``execute`` returning
    the cursor, and ``transaction()`` as a context manager (commit, or rollback on an exception)."""

    def __init__(self, dsn: str) -> None:
        import pymysql

        self.conn = pymysql.connect(**mariadb_connect_args(dsn), autocommit=True, charset="utf8mb4",
                                    connect_timeout=10, init_command="SET time_zone = '+00:00'")

    def execute(self, query: str, params: Any = None) -> Any:
        cur = self.conn.cursor()
        cur.execute(query, [mariadb_value(v) for v in params] if isinstance(params, list | tuple) else params)
        return cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; afterwards the session's principal (`@guard_principal`, set by `attribute`) is
        cleared, as the attribution contract asks of every connection that outlives a transaction."""
        self.conn.begin()
        try:
            yield
        except BaseException:
            self.conn.rollback()
            self.forget_principal()
            raise
        self.conn.commit()
        self.forget_principal()

    def forget_principal(self) -> None:
        """Clear `@guard_principal`: the next transaction on this connection names nobody until it says so."""
        self.conn.cursor().execute("SET @guard_principal = NULL")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> MariaConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mariadb_value(value: Any) -> Any:
    """Aware datetimes as UTC wall-clock time (the session's time zone is UTC; MariaDB has no zone type)."""
    if isinstance(value, _dt.datetime) and value.tzinfo is not None:
        return value.astimezone(_dt.UTC).replace(tzinfo=None)
    return value


def is_mariadb(dsn: str) -> bool:
    return dsn.startswith(("mysql://", "mariadb://"))


def connect(dsn: str) -> Any:
    """A connection to the branch database of `dsn` (autocommit): psycopg, or :class:`MariaConnection`."""
    return MariaConnection(dsn) if is_mariadb(dsn) else psycopg.connect(dsn, autocommit=True)


def device_fingerprint(rng: random.Random) -> bytes:
    """A teller terminal's 32-byte binary fingerprint (MariaDB's ``customer_auth.device_fp``)."""
    return rng.randbytes(32)


#: Who the workload's transactions are attributed to (the attribution contract, docs/policy.md): a teller opens
#: customers, another teller updates contact details, the manager deletes (policy/branch.cedar). Branch 0101's
#: staff; each branch's own are in BRANCH_STAFF (a member of staff writes only their own branch).
OPENER = "Staff:t0101-01"
UPDATER = "Staff:t0101-02"
DELETER = "Staff:m0101-01"
#: (opener, updater, deleter) of each demo branch (guard/workload/synth.py DEMO_STAFF).
BRANCH_STAFF: dict[str, tuple[str, str, str]] = {
    "0101": (OPENER, UPDATER, DELETER),
    "0202": ("Staff:t0202-01", "Staff:t0202-02", "Staff:m0202-01"),
}
#: `run_workload`'s default for a principal: the branch's own member of staff (BRANCH_STAFF).
BRANCH_DEFAULT = "<the branch's staff>"


def attribute(conn: Any, principal: str | None) -> None:
    """Name the open transaction's principal (the attribution contract; None: leave it unattributed).

    PostgreSQL: the transaction-local setting `guard.principal`. MariaDB: the session variable
    `@guard_principal`, which `MariaConnection.transaction` clears when the transaction ends (MariaDB has no
    transaction-local settings)."""
    if isinstance(conn, MariaConnection):
        conn.execute("SET @guard_principal = %s", (principal,))
    elif principal is not None:
        conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))


def next_customer_ids(conn: Any, count: int) -> list[int]:
    """Customer ids never used before, from a sequence: an erased customer's id must not come back
    (the guard refuses new writes for an erased data subject, as a bank would never reuse the id)."""
    conn.execute("CREATE SEQUENCE IF NOT EXISTS workload_customer_id START WITH 1000000")
    if isinstance(conn, MariaConnection):
        return [int(conn.execute("SELECT NEXTVAL(workload_customer_id)").fetchone()[0]) for _ in range(count)]
    rows = conn.execute("SELECT nextval('workload_customer_id') FROM generate_series(1, %s)", (count,)).fetchall()
    return [int(r[0]) for r in rows]


def run_workload(dsn: str, *, customers: int = 20, seed: int | None = None, delete: int = 2,
                 update: int = 5, branch_code: str = "0101", opener: str | None = BRANCH_DEFAULT,
                 updater: str | None = BRANCH_DEFAULT, deleter: str | None = BRANCH_DEFAULT) -> WorkloadResult:
    """Insert `customers` customers (with accounts and transactions), update some, delete some.

    `branch_code` is what the rows' `branch_code` columns say (the MariaDB branch's is 0202). Each
    transaction names its principal (`opener`, `updater`, `deleter`; None: unattributed; by default the
    branch's own staff, BRANCH_STAFF, or branch 0101's for another branch code).
    """
    staff = BRANCH_STAFF.get(branch_code, BRANCH_STAFF["0101"])
    opener, updater, deleter = (staff[i] if who == BRANCH_DEFAULT else who
                                for i, who in enumerate((opener, updater, deleter)))
    rng = random.Random(seed)
    result = WorkloadResult()
    mariadb = is_mariadb(dsn)
    with connect(dsn) as conn:
        ids = next_customer_ids(conn, customers)
        for cid in ids:
            data: Any = synth.demo_dataset(rng.randrange(1 << 30), 1, branch_code)
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
                    if mariadb:
                        auth = dict(auth, device_fp=device_fingerprint(rng))
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


def _insert(conn: Any, table: str, row: dict[str, Any]) -> None:
    columns = list(row)
    placeholders = ", ".join(["%s"] * len(columns))
    conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",  # noqa: S608 - fixed names
        [row[c] for c in columns],
    )
