"""Every sanitized record of a branch workload, opened with the reveal path, against the branch database
(issue 13, finding 16): nothing lost, nothing altered, nothing extra.

The branch workload (`guard.workload.branch.run_workload`: customers with accounts, transactions and
logins; contact-detail updates; deletes of whole customers) runs on the stack's PostgreSQL, the real
Debezium connector streams it, and a `guard run` worker with output topics of its own sanitizes it. Then,
for every table the workload touched, every record of the sanitized topic is decoded and every sealed
image is opened with `guard.protect.reveal.open_image`, the only way back to plaintext. A row's value is
its image's `clear` columns plus its opened sealed columns; `masked` and `index` are display forms and
search tokens, not data, and are not compared. C3 columns are compared as the catalog says they travel:
`hash` columns as the tenant's keyed hash of what reached the guard (recomputed here: Debezium's salted
SHA-256 digest of the database value, since the connector hashes C3 columns at the source), `drop`
columns as absent from every record (the connector excludes them at the source; a `drop` column without
a source rule must be named in `dropped`).

What is checked, per Kafka key (one row) in offset order:

- the history reads create, updates, then optionally delete and tombstone, and nothing else (a second
  create, a record after the tombstone or a tombstone without its delete is a duplicate or a stray);
- each update's and delete's before image equals the previous record's after image (so the records in
  between are checked too, not only the last);
- the last record gives the row's final state: after image equal, column by column, to the row read from
  PostgreSQL by primary key; delete + tombstone for a row that is no longer there;
- every row PostgreSQL holds for the workload's customers has its key (nothing lost), no key maps to a
  row the workload did not write or to another key's row (nothing extra);
- the images of a deleted customer are either opened like any other or, once the delete of the root row
  has shredded the customer's key, fail with `KeyShreddedError` (by design: crypto-shredding); a row
  still in PostgreSQL must always open.

Normalisation (the connector runs the JSON converter without schemas, `decimal.handling.mode=string`,
`time.precision.mode=adaptive_time_microseconds`; psycopg gives Python types):

- `bigint`, `smallint`: a JSON number / `int`: equal ints (a bool is not an int here);
- `text`, `varchar`, `char(n)`: a string / `str`: equal strings (both keep `char(n)` padding);
- `numeric(18,2)`: a string such as `"1234.50"` / `Decimal`: equal `Decimal`s with the same exponent (the
  scale is part of the datum);
- `date`: a number of days since 1970-01-01 (`io.debezium.time.Date`) / `date`: `date - 1970-01-01` in days;
- `timestamptz`: an ISO-8601 string in UTC (`io.debezium.time.ZonedTimestamp`) / an aware `datetime`: both
  as aware datetimes, to the microsecond;
- NULL: null / `None`: both None.

Any other type fails the test (naming the type, not the value) instead of being compared loosely.
Mismatches name the table, the customer id (a clear C1 column), a keyed hash of the primary key (its key
is random per run) and the column; never a value: a test's output is a log too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.rows import dict_row

from guard.classify.catalog import Action, Catalog
from guard.classify.source import source_rules
from guard.config import load_settings
from guard.errors import KeyShreddedError
from guard.keys.manager import KeyManager
from guard.pipeline.runtime import build_keys
from guard.protect.reveal import open_image
from guard.records.codec import decode
from guard.stack.config import StackConfig
from guard.stack.connector import connector_hash_salt
from guard.workload.branch import WorkloadResult, run_workload
from tests.integration.kafka_helpers import Rec
from tests.integration.reliability_helpers import WORKLOAD_TABLES, log_tail, read_from, wait_until
from tests.integration.test_reliability import (
    Scenario,
    _expected_raw,
    _log_dir,
    _new_raw,
    _raw_customer_ops,
    _workload_topics,
)

pytestmark = pytest.mark.integration

PRIMARY_KEYS = {"customers": "customer_id", "accounts": "account_no", "transactions": "txn_id",
                "customer_auth": "customer_id"}
EPOCH = date(1970, 1, 1)
_RUN_KEY = os.urandom(16)


def _tag(value: Any) -> str:
    """A keyed hash of a value for messages: tells keys apart without printing them."""
    return hmac.new(_RUN_KEY, repr(value).encode(), hashlib.sha256).hexdigest()[:12]


def same(pg: Any, dbz: Any) -> bool:
    """Whether a psycopg value and its Debezium JSON form (as sealed or carried in clear) are the same datum."""
    if pg is None:
        return dbz is None
    if isinstance(pg, bool):
        return dbz is pg
    if isinstance(pg, datetime):  # before `date`: a datetime is a date
        if pg.tzinfo is None or not isinstance(dbz, str):
            return False
        try:
            parsed = datetime.fromisoformat(dbz)
        except ValueError:
            return False
        return parsed.tzinfo is not None and parsed == pg
    if isinstance(pg, date):
        return type(dbz) is int and dbz == (pg - EPOCH).days
    if isinstance(pg, Decimal):
        if not isinstance(dbz, str):
            return False
        try:
            value = Decimal(dbz)
        except ArithmeticError:
            return False
        return value == pg and value.as_tuple().exponent == pg.as_tuple().exponent
    if isinstance(pg, int):
        return type(dbz) is int and dbz == pg
    if isinstance(pg, str):
        return isinstance(dbz, str) and dbz == pg
    raise TypeError(f"no normalisation for a PostgreSQL value of type {type(pg).__name__}")


def test_same_normalises_debezium_forms_and_nothing_else():
    """The comparison itself: the forms the connector writes match; near misses do not."""
    from datetime import timedelta, timezone

    stamp = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=8)))
    assert same(stamp, "2026-01-01T19:04:05.678901Z")
    assert not same(stamp, "2026-01-01T19:04:05.678900Z")
    assert not same(stamp, "2026-01-01T19:04:05.678901")  # no zone: not a timestamptz
    assert same(date(1990, 5, 17), (date(1990, 5, 17) - EPOCH).days)
    assert not same(date(1990, 5, 17), "1990-05-17")
    assert same(Decimal("1234.50"), "1234.50")
    assert not same(Decimal("1234.50"), "1234.5")  # the scale is part of the datum
    assert not same(Decimal("1234.50"), 1234.5)
    assert same(7, 7) and not same(7, "7") and not same(1, True)
    assert same("CNY", "CNY") and not same("CNY", "CNY ")
    assert same(None, None) and not same(None, "") and not same("", None)
    with pytest.raises(TypeError, match="bytes"):
        same(b"\x00", "AA==")


def _value_bytes(pg: Any, column: str) -> bytes:
    """What the guard hashes for a C3 `hash` column: the Debezium value's bytes (text columns only here)."""
    if isinstance(pg, str):
        return pg.encode()
    raise TypeError(f"no Debezium form of a {type(pg).__name__} for the keyed hash of {column}")


@dataclass
class Image:
    """One image of one sanitized record: what the record carries, and what its sealed part opened to."""

    clear: dict[str, Any]
    opened: dict[str, Any] | None  # None: not opened (shredded key or erased form)
    hashed: dict[str, str]
    dropped: list[str]
    state: str  # opened | shredded (key destroyed) | erased (sealed part left out) | broken

    @property
    def values(self) -> dict[str, Any]:
        return {**self.clear, **(self.opened or {})}

    def same_as(self, other: Image) -> bool:
        return (self.clear, self.opened, self.hashed, sorted(self.dropped)) == (
            other.clear, other.opened, other.hashed, sorted(other.dropped))


@dataclass
class Step:
    rec: Rec
    op: str  # c, r, u, d or tombstone
    before: Image | None = None
    after: Image | None = None


@dataclass
class Row:
    """One Kafka key of a sanitized topic: the records of one row, in offset order."""

    table: str
    key: bytes
    steps: list[Step] = field(default_factory=list)

    @property
    def customer(self) -> Any:
        for step in self.steps:
            for img in (step.after, step.before):
                if img is not None and "customer_id" in img.clear:
                    return img.clear["customer_id"]
        return None

    def where(self, pk: Any = None) -> str:
        """How a message names this row: table, customer id (clear C1), keyed hash of the key or primary key."""
        return f"{self.table} customer_id={self.customer} row {_tag(pk if pk is not None else self.key)}"


class Comparison:
    """Reads the test's sanitized topics, opens every image and compares them with PostgreSQL."""

    def __init__(self, sc: Scenario, keys: KeyManager, catalog: Catalog, results: list[WorkloadResult]) -> None:
        self.sc = sc
        self.keys = keys
        self.catalog = catalog
        #: C3 columns the connector drops or hashes at the source (rendered from the same catalog).
        self.source_rules = {(rule.table, rule.column) for rule in source_rules(catalog)}
        self.salt = connector_hash_salt(StackConfig.from_env())
        self.customers = {c for r in results for c in r.customers}
        self.deleted = {c for r in results for c in r.deleted_customers}
        self.counts: dict[str, int] = defaultdict(int)

    def topic(self, table: str) -> str:
        return f"{self.sc.sanitized_prefix}br0101.public.{table}"

    def _image(self, doc: dict[str, Any], name: str, rec: Rec, problems: list[str], where: str) -> Image | None:
        img = doc.get(name)
        if img is None:
            return None
        opened: dict[str, Any] | None = None
        if img.get("sealed") is None:
            # No sealed part: the subject was erased before this change was processed (the columns are
            # named in `erased`), or the table has no protected column at all (nothing to open).
            state = "erased" if img["erased"] else "opened"
            opened = None if img["erased"] else {}
        else:
            try:
                opened = open_image(self.keys, doc, name, topic=rec.topic, row_key=rec.key)
                state = "opened"
            except KeyShreddedError:
                state = "shredded"
            except Exception as exc:  # noqa: BLE001 - any other failure to open is a finding, named by type
                problems.append(f"{where}: the {name} image at offset {rec.offset} does not open "
                                f"({type(exc).__name__})")
                state = "broken"
        self.counts[f"images {state}"] += 1
        if opened is not None and set(opened) & set(img["clear"]):
            problems.append(f"{where}: columns both sealed and in clear: {sorted(set(opened) & set(img['clear']))}")
        return Image(dict(img["clear"]), opened, dict(img["hashed"]), list(img["dropped"]), state)

    def rows(self, table: str, problems: list[str]) -> list[Row]:
        by_key: dict[bytes, Row] = {}
        records = sorted(read_from(self.sc.bootstrap, self.topic(table)), key=lambda r: (r.partition, r.offset))
        for rec in records:
            self.counts[f"records {table}"] += 1
            if rec.key is None:
                problems.append(f"{table}: record at {rec.partition}@{rec.offset} has no key")
                continue
            row = by_key.setdefault(rec.key, Row(table, rec.key))
            where = f"{table} row {_tag(rec.key)}"
            if rec.value is None:
                row.steps.append(Step(rec, "tombstone"))
                continue
            doc = decode(rec.value)
            if doc["unclassified"]:
                problems.append(f"{where}: unclassified columns {sorted(doc['unclassified'])}")
            if doc["table"] != f"public.{table}":
                problems.append(f"{where}: record names table {doc['table']}")
            row.steps.append(Step(rec, doc["op"], self._image(doc, "before", rec, problems, where),
                                  self._image(doc, "after", rec, problems, where)))
        return list(by_key.values())

    def database(self, table: str) -> dict[Any, dict[str, Any]]:
        pk = PRIMARY_KEYS[table]
        with psycopg.connect(self.sc.env["GUARD_BRANCH_DSN"], row_factory=dict_row) as conn:
            found = conn.execute(f"SELECT * FROM {table} WHERE customer_id = ANY(%s)",  # noqa: S608 - fixed names
                                 (sorted(self.customers),)).fetchall()
        return {r[pk]: r for r in found}

    def compare_row(self, table: str, row: Row, pk: Any, pg: dict[str, Any], img: Image) -> list[str]:
        where, problems = row.where(pk), []
        opened = img.opened or {}
        for column, value in pg.items():
            policy = self.catalog.column(f"public.{table}", column)
            if policy is None:
                problems.append(f"{where}: column {column} is not in the catalog")
            elif policy.action in (Action.CLEAR, Action.ENCRYPT):
                carried, part = (img.clear, "clear") if policy.action is Action.CLEAR else (opened, "sealed")
                if column not in carried:
                    problems.append(f"{where}: column {column} is missing from {part}")
                elif not same(value, carried[column]):
                    problems.append(f"{where}: column {column} differs")
            elif policy.action is Action.HASH:
                if value is not None and (f"public.{table}", column) in self.source_rules:
                    value = hashlib.sha256((self.salt + value).encode()).hexdigest()  # Debezium's digest
                want = None if value is None else self.keys.keyed_hash.digest(column, _value_bytes(value, column))
                if img.hashed.get(column) != want:
                    problems.append(f"{where}: keyed hash of column {column} differs")
            elif (f"public.{table}", column) in self.source_rules:  # Action.DROP, excluded at the source
                if column in img.dropped:
                    problems.append(f"{where}: column {column}, excluded at the source, reached the guard")
            elif column not in img.dropped:  # Action.DROP
                problems.append(f"{where}: column {column} is not named as dropped")
            carried_anywhere = column in img.clear or column in opened or column in img.hashed
            if policy is not None and policy.action is Action.DROP and carried_anywhere:
                problems.append(f"{where}: dropped column {column} is carried")
        extra = (set(img.clear) | set(opened) | set(img.hashed) | set(img.dropped)) - set(pg)
        if extra:
            problems.append(f"{where}: columns the database row does not have: {sorted(extra)}")
        return problems

    def run(self) -> list[str]:
        """Every problem found (an empty list: the sanitized topics and the database agree)."""
        problems: list[str] = []
        self.counts.clear()
        with psycopg.connect(self.sc.env["GUARD_BRANCH_DSN"]) as conn:
            surviving = {r[0] for r in conn.execute("SELECT customer_id FROM customers WHERE customer_id = ANY(%s)",
                                                    (sorted(self.customers),)).fetchall()}
        if surviving != self.customers - self.deleted:
            problems.append("the workload's customers in the database are not the created minus the deleted ones")
        for table in WORKLOAD_TABLES:
            pk_column = PRIMARY_KEYS[table]
            database = self.database(table)
            matched: dict[Any, bytes] = {}
            for row in self.rows(table, problems):
                problems += self._history(row)
                customer = row.customer
                if customer not in self.customers:
                    problems.append(f"{row.where()}: a sanitized row of a customer the workload did not write")
                    continue
                last = row.steps[-1]
                if last.op == "tombstone":
                    pk = self._deleted_pk(row, pk_column)
                    if pk is not None and pk in database:
                        problems.append(f"{row.where(pk)}: deleted in the sanitized topic, still in the database")
                    if pk is None and customer in surviving:
                        problems.append(f"{row.where()}: a row of a customer still in the database can't be opened")
                    continue
                img = last.after
                if img is None or img.opened is None:
                    if customer in surviving:
                        problems.append(f"{row.where()}: the last image of a row still in the database is "
                                        f"{img.state if img else 'missing'}")
                    continue
                pk = img.values.get(pk_column)
                if pk not in database:
                    problems.append(f"{row.where(pk)}: in the sanitized topic, not in the database (extra)")
                    continue
                if pk in matched:
                    problems.append(f"{row.where(pk)}: two sanitized keys for one database row")
                    continue
                matched[pk] = row.key
                problems += self.compare_row(table, row, pk, database[pk], img)
            for pk, pg in database.items():
                if pk not in matched:
                    problems.append(f"{table} customer_id={pg['customer_id']} row {_tag(pk)}: in the database, "
                                    "no sanitized record (lost)")
            self.counts[f"rows {table}"] = len(database)
        return problems

    @staticmethod
    def _deleted_pk(row: Row, pk_column: str) -> Any:
        for step in reversed(row.steps):
            for img in (step.before, step.after):
                if img is not None and img.opened is not None and pk_column in img.values:
                    return img.values[pk_column]
        return None

    def _history(self, row: Row) -> list[str]:
        ops = [s.op for s in row.steps]
        body = ops[:-2] if ops[-2:] == ["d", "tombstone"] else ops
        problems = []
        if not body or body[0] not in ("c", "r") or any(op != "u" for op in body[1:]):
            problems.append(f"{row.where()}: history {ops} is not create, updates, then delete and tombstone")
        previous: Image | None = None
        for step in row.steps:
            if (step.op in ("u", "d") and previous is not None and step.before is not None
                    and previous.state == step.before.state == "opened" and not step.before.same_as(previous)):
                problems.append(f"{row.where()}: the before image at offset {step.rec.offset} differs from "
                                "the previous after image")
            if step.op == "tombstone":
                continue
            if (step.op in ("c", "r", "u")) != (step.after is not None) or (step.op in ("u", "d")) != (
                    step.before is not None):
                problems.append(f"{row.where()}: op {step.op} at offset {step.rec.offset} with the wrong images")
            previous = step.after
        for step in row.steps:
            for img in (step.before, step.after):
                if img is not None and img.state != "opened" and row.customer not in self.deleted:
                    problems.append(f"{row.where()}: an image of a customer never deleted is {img.state}")
        return problems


def _balance_updates(dsn: str, customers: list[int]) -> int:
    """Updates of account balances, so decimals travel in the before and after images of updates too."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("UPDATE accounts SET balance = balance + 1.25 WHERE customer_id = ANY(%s)", (customers,))
        return cur.rowcount


def test_every_sanitized_record_opens_to_what_the_branch_database_holds(stack: dict[str, str],
                                                                         request: pytest.FixtureRequest):
    sc = Scenario(stack, _log_dir(request))
    keys = build_keys(load_settings(None, redis_url=stack["GUARD_REDIS_URL"]), listen=False)
    catalog = Catalog.load()
    try:
        worker = sc.cdc_worker(1).start()
        seed = random.randrange(1 << 30)
        print(f"workload seed {seed}")
        dsn = stack["GUARD_BRANCH_DSN"]
        results = [run_workload(dsn, customers=6, update=3, delete=2, seed=seed)]
        survivors = [c for c in results[0].customers if c not in results[0].deleted_customers]
        assert _balance_updates(dsn, survivors[:2]) > 0
        wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=120,
                   what="Debezium to deliver the workload")
        comparison = Comparison(sc, keys, catalog, results)
        problems: list[str] = []

        def agree() -> bool:
            problems[:] = comparison.run()
            return not problems

        try:
            wait_until(agree, timeout=120, interval=3, what="the sanitized topics to agree with the database")
        except AssertionError:
            pytest.fail(f"{len(problems)} differences between the sanitized topics and the branch database:\n"
                        + "\n".join(problems[:40]) + "\n" + log_tail(worker))
        topics = _workload_topics()
        sc.wait_decided(_new_raw(sc, topics), timeout=90, topics=topics)
        sc.stop_all()
        # Once more with the worker stopped and every raw record decided: nothing arrived since that differs.
        problems = comparison.run()
        assert not problems, "\n".join(problems[:40])
        print(orjson.dumps(dict(sorted(comparison.counts.items()))).decode())
        for table in WORKLOAD_TABLES:
            assert comparison.counts[f"rows {table}"] > 0, f"the workload wrote no {table} rows"
        assert comparison.counts["images opened"] > 0
        sc.check_raw_inputs(topics, results)
    finally:
        sc.kill_all()
