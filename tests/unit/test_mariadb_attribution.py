"""The MariaDB branch's attribution contract without a server (docs/policy.md, "Attribution"): the change events
of Debezium's MariaDB connector carry their transaction's GTID, which joins a delete with the attribution rows
its triggers inserted; the raw-bytes scan reads `updated_by` from MariaDB's events as from PostgreSQL's; the
SQL the stack runs gives the triggers' definer no more than it needs and the application no way to write an
attribution; the workload names each branch's own staff. On the real stack: tests/integration/test_mariadb_branch.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from guard.cdc.envelope import decode_value
from guard.config import load_settings
from guard.pipeline.policy import ATTRIBUTION_TABLE, NOT_A_WRITE, AttributionPending, WriteChecker, message_principal
from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities
from guard.stack.config import StackConfig
from guard.stack.provision import (
    MARIADB_ATTRIBUTED_TABLES,
    mariadb_attribution_sql,
    mariadb_bootstrap_sql,
    sql_statements,
)
from guard.workload.branch import BRANCH_STAFF, DELETER, OPENER
from guard.workload.synth import DEMO_STAFF

GTID = "0-202-1234"
MANAGER = "Staff:m0202-01"
STAFF = staff_entities([(s, b, o, a, list(r)) for s, _, b, o, a, r in DEMO_STAFF])


class Attributions:
    """The key store's attribution sets, in memory (the real ones: the integration tests)."""

    def __init__(self) -> None:
        self.exchanges = 0  # round trips of `exchange_attributions`
        self.sets: dict[int | str, set[str]] = {}

    def record_attribution(self, branch: str, tx_id: int | str, principal: str) -> None:
        self.sets.setdefault(tx_id, set()).add(principal)

    def attributions(self, branch: str, tx_ids: list[int | str]) -> dict[int | str, set[str]]:
        return {t: set(self.sets[t]) for t in tx_ids if t in self.sets}

    def exchange_attributions(self, branch: str, recorded: Iterable[tuple[int | str, str]],
                              wanted: Iterable[int | str]) -> dict[int | str, set[str]]:
        self.exchanges += 1
        for tx_id, principal in recorded:
            self.sets.setdefault(tx_id, set()).add(principal)
        return {t: set(self.sets[t]) for t in wanted if t in self.sets}


@pytest.fixture
def checker() -> WriteChecker:
    settings = load_settings(None, policy_staff="file", attribution_wait_s=30.0).for_branch("0202", "br0202")
    return WriteChecker(settings, PolicyEngine(default_directory(), entity_source=lambda: STAFF),
                        Attributions())  # type: ignore[arg-type]


def source(db: str = "branch_0202", table: str = "customers", gtid: str | None = GTID) -> dict[str, Any]:
    """A MariaDB connector 3.5.0 `source` block as the stack's connector writes it (fields in its order)."""
    return {"version": "3.5.0.Final", "connector": "mariadb", "name": "br0202", "ts_ms": 1_800_000_000_000,
            "snapshot": "false", "db": db, "sequence": None, "ts_us": 1_800_000_000_000_000,
            "ts_ns": 1_800_000_000_000_000_000, "table": table, "server_id": 202, "gtid": gtid,
            "file": "binlog.000002", "pos": 4711, "row": 0, "thread": None, "query": None}


def change(op: str, principal: str | None, *, before_principal: str | None = "Staff:t0202-01",
           gtid: str | None = GTID) -> bytes:
    row = {"customer_id": 7, "name": "x", "branch_code": "0202", "created_at": "2026-12-03T20:00:00.000000Z"}
    before = {**row, "updated_by": before_principal} if op in ("u", "d") else None
    after = None if op == "d" else {**row, "updated_by": principal}
    return orjson.dumps({"before": before, "after": after, "source": source(gtid=gtid), "transaction": None,
                         "op": op, "ts_ms": 1_800_000_000_100, "ts_us": 1_800_000_000_100_000,
                         "ts_ns": 1_800_000_000_100_000_000})


def attribution(principal: str | None, gtid: str | None = GTID) -> bytes:
    """What the delete trigger's insert into the BLACKHOLE table looks like on `br0202.message`."""
    return orjson.dumps({"before": None, "after": {"principal": principal},
                         "source": source("guard_admin", "principal_messages", gtid), "transaction": None,
                         "op": "c", "ts_ms": 1_800_000_000_100})


def test_the_gtid_is_the_transaction_id_of_a_mariadb_change() -> None:
    event = decode_value(change("d", None))
    assert event is not None and event.tx_id == GTID and event.schema_table == "branch_0202.customers"
    assert decode_value(change("c", None, gtid=None)).tx_id is None  # type: ignore[union-attr] # a snapshot read
    # PostgreSQL's integer txId wins where it is (a PostgreSQL source has no gtid anyway)
    pg = orjson.loads(change("d", None))
    pg["source"] = {"connector": "postgresql", "db": "b", "schema": "public", "table": "customers", "txId": 77}
    assert decode_value(orjson.dumps(pg)).tx_id == 77  # type: ignore[union-attr]


def test_an_attribution_row_names_its_principal_and_nothing_else_does() -> None:
    assert ATTRIBUTION_TABLE == "guard_admin.principal_messages"
    assert message_principal(decode_value(attribution("Staff:m0202-01"))) == "Staff:m0202-01"  # type: ignore[arg-type]
    assert message_principal(decode_value(attribution(None))) == ""  # type: ignore[arg-type] # names nobody
    # a branch table's insert, or an attribution table of another database, is no attribution
    assert message_principal(decode_value(change("c", "Staff:m0202-01"))) is None  # type: ignore[arg-type]
    other = orjson.loads(attribution("Staff:m0202-01"))
    other["source"]["db"] = "branch_0202"
    assert message_principal(decode_value(orjson.dumps(other))) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("principal,expected", [
    ("Staff:t0202-01", "allow"), ("Staff:m0202-01", "allow"), ("Staff:t0101-01", "deny"), (None, "unattributed")])
def test_the_scan_reads_mariadb_events_as_the_decoder_does(checker: WriteChecker, principal: str | None,
                                                           expected: str) -> None:
    for op in ("c", "u"):
        raw = change(op, principal)
        scanned = checker.scan(raw, "branch_0202.customers")
        decided = checker.decide_event(decode_value(raw), ("br0202.branch_0202.customers", 0, 1))  # type: ignore[arg-type]
        assert scanned == (op, decided) and decided is not None and decided.decision == expected
    snapshot = orjson.loads(change("c", "Staff:t0202-01"))
    snapshot["op"] = "r"
    assert checker.scan(orjson.dumps(snapshot), "branch_0202.customers") == ("r", NOT_A_WRITE)
    assert checker.scan(change("d", None), "branch_0202.customers") is None  # joined with its attribution


def test_a_delete_is_the_deleters_not_the_last_writers(checker: WriteChecker) -> None:
    delete = decode_value(change("d", None, before_principal="Staff:t0202-01"))
    assert delete is not None
    with pytest.raises(AttributionPending):
        checker.decide_event(delete, ("br0202.branch_0202.customers", 0, 5))
    # one row trigger per deleted row: three rows deleted by the manager are one principal
    for _ in range(3):
        message = decode_value(attribution("Staff:m0202-01"))
        assert message is not None and checker.record_message(message) == "Staff:m0202-01"
    decided = checker.decide_event(delete, ("br0202.branch_0202.customers", 0, 5))
    assert decided is not None and (decided.decision, decided.principal, decided.action) == (
        "allow", "Staff:m0202-01", "delete")
    # a teller may not delete; another transaction's attribution is not this one's
    other = decode_value(change("d", None, gtid="0-202-1235"))
    checker.record_message(decode_value(attribution("Staff:t0202-01", "0-202-1235")))  # type: ignore[arg-type]
    assert checker.decide_event(other, ("br0202.branch_0202.customers", 0, 6)).decision == "deny"  # type: ignore[arg-type,union-attr]
    # two principals in one transaction: nobody's
    checker.record_message(decode_value(attribution("Staff:t0202-01")))  # type: ignore[arg-type]
    mixed = checker.decide_event(delete, ("br0202.branch_0202.customers", 0, 7))
    assert mixed is not None and mixed.decision == "unattributed" and "several principals" in mixed.reason
    # a session that named nobody: unattributed at once, no wait
    nobody = decode_value(change("d", None, gtid="0-202-1236"))
    checker.record_message(decode_value(attribution(None, "0-202-1236")))  # type: ignore[arg-type]
    assert checker.decide_event(nobody, ("br0202.branch_0202.customers", 0, 8)).decision == "unattributed"  # type: ignore[arg-type,union-attr]


@pytest.fixture
def cfg(tmp_path: Path) -> StackConfig:
    return StackConfig.from_env({"GUARD_STACK_HOME": str(tmp_path / "home"), "GUARD_CACHE_DIR": str(tmp_path)})


def test_the_attribution_table_is_the_guards_and_the_triggers_run_as_a_locked_account(cfg: StackConfig) -> None:
    sql = mariadb_bootstrap_sql(cfg)
    definer = "'guard_attribution'@'localhost'"
    assert "CREATE DATABASE IF NOT EXISTS `guard_admin`" in sql
    assert "CREATE TABLE IF NOT EXISTS `guard_admin`.`principal_messages` (principal VARCHAR(255) NULL) " \
           "ENGINE=BLACKHOLE;" in sql
    assert f"CREATE USER IF NOT EXISTS {definer} ACCOUNT LOCK;" in sql
    grants = [line for line in sql.splitlines() if line.startswith("GRANT") and definer in line]
    assert grants == [f"GRANT INSERT ON `guard_admin`.`principal_messages` TO {definer};",
                      f"GRANT TRIGGER ON `branch_0202`.* TO {definer};"]
    # the application account gets nothing on the attribution database; the CDC account reads the table only
    assert not [line for line in sql.splitlines() if "guard_admin" in line and "branch_app" in line]
    assert "GRANT SELECT ON `guard_admin`.`principal_messages` TO 'cdc'@'127.0.0.1';" in sql
    statements = sql_statements(mariadb_attribution_sql(cfg))
    assert len(statements) == 4 * len(MARIADB_ATTRIBUTED_TABLES) and len(MARIADB_ATTRIBUTED_TABLES) == 4
    stamp = "FOR EACH ROW SET NEW.updated_by = LEFT(NULLIF(@guard_principal, ''), 255)"
    for n, table in enumerate(MARIADB_ATTRIBUTED_TABLES):
        grant, on_insert, on_update, on_delete = statements[4 * n:4 * n + 4]
        # the definer may set that one column, as the BEFORE triggers do, and no other
        assert grant == f"GRANT UPDATE (updated_by) ON `branch_0202`.`{table}` TO {definer}"
        assert on_insert == (f"CREATE OR REPLACE DEFINER = {definer} TRIGGER `branch_0202`.`{table}_guard_principal_"
                             f"insert` BEFORE INSERT ON `branch_0202`.`{table}` {stamp}")
        assert on_update == on_insert.replace("insert` BEFORE INSERT", "update` BEFORE UPDATE")
        assert on_delete == (f"CREATE OR REPLACE DEFINER = {definer} TRIGGER `branch_0202`.`{table}_guard_principal_"
                             f"delete` AFTER DELETE ON `branch_0202`.`{table}` FOR EACH ROW INSERT INTO `guard_admin`."
                             "`principal_messages` (principal) VALUES (LEFT(NULLIF(@guard_principal, ''), 255))")


def test_sql_statements_splits_at_line_ends_and_drops_comment_lines() -> None:
    script = "-- a comment; with a semicolon\nCREATE TABLE t (a INT);\n-- another\nINSERT INTO t VALUES (1);\n\n"
    assert sql_statements(script) == ["CREATE TABLE t (a INT)", "INSERT INTO t VALUES (1)"]


def test_the_workload_names_each_branchs_own_staff_and_they_exist_in_the_directory() -> None:
    assert BRANCH_STAFF["0101"] == (OPENER, "Staff:t0101-02", DELETER)
    directory = {s: (branch, roles) for s, _, branch, _, active, roles in DEMO_STAFF if active}
    for branch, (opener, updater, deleter) in BRANCH_STAFF.items():
        for who, role in ((opener, "teller"), (updater, "teller"), (deleter, "manager")):
            assert directory[who.removeprefix("Staff:")] == (branch, (role,)), who


class _Store(Attributions):
    """What the sanitizer asks of the key store here, in memory: tenant keys and the attribution sets."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapped: dict[str, bytes] = {}

    def tenant_keys(self, wrapped_if_absent: dict[str, bytes]) -> dict[str, bytes]:
        return {p: self.wrapped.setdefault(p, w) for p, w in wrapped_if_absent.items()}

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        return [p for p in purposes if p not in self.wrapped]


def test_the_message_topic_is_audited_and_never_sanitized() -> None:
    """On `br0202.message` an attribution row is recorded for its GTID and audited as `attribution`; a tombstone
    (or anything else) is audited as `message_ignored`; neither writes to a sanitized topic or the DLQ."""
    from guard.classify.catalog import Catalog
    from guard.config import Settings
    from guard.keys.kms import LocalKeyring
    from guard.keys.manager import KeyManager
    from guard.pipeline.sanitizer import Sanitizer
    from guard.records.codec import decode

    store = _Store()
    settings = Settings(worker_id="w1", hot_path="python", policy_staff="file").for_branch("0202", "br0202")
    keys = KeyManager(LocalKeyring(b"m" * 32), store, "t", listen=False)  # type: ignore[arg-type]
    sanitizer = Sanitizer(settings, keys, Catalog.load(), clock=lambda: 1000.0)
    sanitizer.checker = WriteChecker(settings, PolicyEngine(default_directory(), entity_source=lambda: STAFF),
                                     store)  # type: ignore[arg-type]
    assert sanitizer.checker.message_topic == "br0202.message"
    out = sanitizer.process("br0202.message", 2, 0, None, attribution(MANAGER))
    assert [r.topic for r in out.records] == ["guard.audit"] and store.sets == {GTID: {MANAGER}}
    audit = decode(out.records[0].value)
    assert audit["decision"] == "attribution" and orjson.loads(audit["reason"]) == {
        "tx_id": GTID, "principal": MANAGER, "prefix": None, "table": "guard_admin.principal_messages"}
    ignored = sanitizer.process("br0202.message", 2, 1, None, None)
    assert [(r.topic, decode(r.value)["decision"]) for r in ignored.records] == [("guard.audit", "message_ignored")]
