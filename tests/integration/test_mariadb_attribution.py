"""Writes on the MariaDB branch (0202) attributed and checked on the real stack (issue 14, item 2).

The branch application names each transaction's principal in `@guard_principal`; the tables' triggers, all
running as a locked guard account, stamp it into `updated_by` (BEFORE INSERT/UPDATE) or insert it into the
BLACKHOLE table `guard_admin.principal_messages` (AFTER DELETE), which Debezium's MariaDB connector captures and
routes to `br0202.message`. A `guard run` worker for branch 0202 (its own audit, anomaly and sanitized topics)
decides every change with the demo policy: the branch's own tellers write and its manager deletes (allowed),
staff of another branch are denied, a change without a principal is `unattributed` with an anomaly, a delete is
the deleter's (joined with its transaction's attribution rows on `source.gtid`), not the row's last writer's.
The application account can't write the attribution table, plant a trigger that runs as the guard's account,
nor drop the guard's triggers. About 20 rows; ~35 s on the 2-core machine, most of it waiting for Debezium and
the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pymysql
import pytest

from guard.records.codec import decode, write_decision_of
from guard.stack.config import StackConfig
from guard.stack.mariadb import MariaDB
from guard.workload.branch import BRANCH_STAFF, MariaConnection, attribute, next_customer_ids, run_workload
from tests.integration.kafka_helpers import GuardProcess, read_all
from tests.integration.reliability_helpers import unique, wait_until
from tests.integration.test_policy import _doc

pytestmark = pytest.mark.integration

PREFIX = "br0202"
RAW = f"{PREFIX}.branch_0202.customers"
MESSAGES = f"{PREFIX}.message"
TELLER, OTHER_TELLER, MANAGER = "Staff:t0202-01", "Staff:t0202-02", "Staff:m0202-01"
OUTSIDER = "Staff:t0101-01"  # a teller of branch 0101


class Branch:
    """The MariaDB branch as its application uses it: each transaction names its principal, and the
    connection forgets it when the transaction ends (`MariaConnection.transaction`)."""

    def __init__(self, dsn: str) -> None:
        self.db = MariaConnection(dsn)

    def insert(self, principal: str | None, *, claims: str | None = None) -> int:
        """A new customer; `claims` is what the statement itself writes into updated_by (the trigger wins)."""
        cid = next_customer_ids(self.db, 1)[0]
        with self.db.transaction():
            attribute(self.db, principal)
            self.db.execute("INSERT INTO customers (customer_id, name, mobile, branch_code, updated_by) "
                            "VALUES (%s, %s, %s, '0202', %s)", (cid, "测试客户", "13800138000", claims))
        return cid

    def update(self, cid: int, principal: str | None) -> None:
        with self.db.transaction():
            attribute(self.db, principal)
            self.db.execute("UPDATE customers SET mobile = %s WHERE customer_id = %s", ("13900139000", cid))

    def delete(self, cids: list[int], principal: str | None) -> None:
        with self.db.transaction():
            attribute(self.db, principal)
            self.db.execute(f"DELETE FROM customers WHERE customer_id IN ({', '.join(['%s'] * len(cids))})",  # noqa: S608
                            cids)


@pytest.fixture(scope="module")
def run(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("maria-attrib")
    branch = Branch(stack["GUARD_BRANCH2_DSN"])
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    # the attribution topic exists before the worker subscribes (Connect creates it with the first delete)
    warm = branch.insert(MANAGER)
    branch.delete([warm], MANAGER)
    wait_until(lambda: read_all(bootstrap, MESSAGES), timeout=120, what=f"{MESSAGES} to exist")
    prefix = unique("mat")
    topics = {"audit": f"guard.audit.{prefix}", "anomalies": f"guard.anomalies.{prefix}",
              "sanitized": f"sanitized.{prefix}."}
    env = {"GUARD_BRANCH": "0202", "GUARD_RAW_TOPIC_PREFIX": PREFIX, "GUARD_POLICY_STAFF": "db",
           "GUARD_AUDIT_TOPIC": topics["audit"], "GUARD_ANOMALIES_TOPIC": topics["anomalies"],
           "GUARD_SANITIZED_PREFIX": topics["sanitized"], "GUARD_DLQ_TOPIC": f"guard.dlq.{prefix}",
           "GUARD_DELETIONS_TOPIC": f"guard.deletions.{prefix}", "GUARD_ATTRIBUTION_WAIT_S": "10"}
    worker = GuardProcess(stack, worker_id=unique("maw-"), group_id=unique("maria-attrib-"), log_dir=tmp,
                          extra_env=env)
    worker.start(from_end=True)
    try:
        yield {"bootstrap": bootstrap, "worker": worker, "branch": branch, **topics}
    finally:
        worker.stop()
        branch.db.close()


def _raw(run: dict[str, Any], cid: int, op: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(partition, offset, value) of every raw change `op` of customer `cid`, waiting for the first."""
    def find() -> list[tuple[int, int, dict[str, Any]]]:
        out = []
        for rec in read_all(run["bootstrap"], RAW):
            doc = _doc(rec.value)
            row = doc.get("before") if op == "d" else doc.get("after")
            if doc.get("op") == op and row and row.get("customer_id") == cid:
                out.append((rec.partition, rec.offset, doc))
        return out
    found: list[tuple[int, int, dict[str, Any]]] = wait_until(find, timeout=120, what=f"raw {op} of {cid}")
    return found


def _decisions(run: dict[str, Any], cid: int, op: str) -> list[dict[str, Any]]:
    """The audited write decisions on the changes `op` of customer `cid`, in raw-offset order."""
    wanted = [(p, o) for p, o, _ in _raw(run, cid, op)]

    def find() -> list[dict[str, Any]] | None:
        got = {}
        for rec in read_all(run["bootstrap"], run["audit"]):
            audit = decode(rec.value)
            if audit["source_topic"] == RAW and (write := write_decision_of(audit)) is not None:
                # audit format 2: the change's own record carries its write decision
                got[(audit["source_partition"], audit["source_offset"])] = {**audit, "decision": write[0],
                                                                            "detail": write[1]}
        if all(w in got for w in wanted):
            return [got[w] for w in sorted(wanted)]
        return None
    try:
        found: list[dict[str, Any]] = wait_until(find, timeout=180, what=f"the decisions on {op} of {cid}")
    except AssertionError:
        print(run["worker"].log()[-4000:])
        raise
    return found


def _alert(run: dict[str, Any], rule: str, decision: dict[str, Any]) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for rec in read_all(run["bootstrap"], run["anomalies"]):
            alert = orjson.loads(rec.value)
            if alert["rule"] == rule and (alert["source"]["partition"], alert["source"]["offset"]) == (
                    decision["source_partition"], decision["source_offset"]):
                return dict(alert)
        return None
    found: dict[str, Any] = wait_until(find, timeout=60, what=f"the {rule} anomaly")
    return found


def test_writes_name_their_principal_and_are_decided_by_the_policy(run: dict[str, Any]) -> None:
    branch = run["branch"]
    mine = branch.insert(TELLER, claims=MANAGER)  # the statement can't name anybody else: the trigger wins
    branch.update(mine, OUTSIDER)
    (_, _, raw), = _raw(run, mine, "c")
    assert raw["after"]["updated_by"] == TELLER
    (created,) = _decisions(run, mine, "c")
    assert created["decision"] == "write_allowed" and created["op"] == "c"
    assert created["detail"]["principal"] == TELLER and created["detail"]["policies"] == ["teller-writes-own-branch"]
    (denied,) = _decisions(run, mine, "u")
    assert denied["decision"] == "write_denied" and denied["detail"]["principal"] == OUTSIDER
    assert _alert(run, "write_denied", denied)["principal"] == OUTSIDER


def test_a_write_without_a_principal_is_unattributed_and_raises_an_anomaly(run: dict[str, Any]) -> None:
    branch = run["branch"]
    named = branch.insert(TELLER)
    # the same connection after the transaction: the principal was cleared, this write names nobody
    cid = next_customer_ids(branch.db, 1)[0]
    branch.db.execute("INSERT INTO customers (customer_id, name, branch_code) VALUES (%s, %s, '0202')",
                      (cid, "无名客户"))
    (_, _, raw), = _raw(run, cid, "c")
    assert raw["after"]["updated_by"] is None
    (decision,) = _decisions(run, cid, "c")
    assert decision["decision"] == "unattributed" and decision["detail"]["principal"] is None
    assert _alert(run, "write_unattributed", decision)["severity"] == "high"
    assert _decisions(run, named, "c")[0]["decision"] == "write_allowed"


def test_a_delete_is_decided_with_its_deleter_not_the_last_writer(run: dict[str, Any]) -> None:
    branch = run["branch"]
    by_manager = [branch.insert(TELLER) for _ in range(2)]  # one statement, two rows: two attribution rows
    by_teller, by_nobody = branch.insert(TELLER), branch.insert(TELLER)
    branch.delete(by_manager, MANAGER)
    branch.delete([by_teller], OTHER_TELLER)
    branch.delete([by_nobody], None)
    for cid in by_manager:
        (_, _, raw), = _raw(run, cid, "d")
        assert raw["before"]["updated_by"] == TELLER  # the before image names the last writer ...
        (decision,) = _decisions(run, cid, "d")  # ... the decision the deleter
        assert decision["decision"] == "write_allowed" and decision["detail"]["action"] == "delete"
        assert decision["detail"]["principal"] == MANAGER
        assert decision["detail"]["policies"] == ["manager-writes-and-deletes-own-branch"]
    (teller,) = _decisions(run, by_teller, "d")
    assert teller["decision"] == "write_denied" and teller["detail"]["principal"] == OTHER_TELLER
    (nobody,) = _decisions(run, by_nobody, "d")
    assert nobody["decision"] == "unattributed" and "no attribution message" not in nobody["detail"]["reason"]
    _alert(run, "write_unattributed", nobody)
    # the join key: the attribution rows carry the deleting transaction's GTID, as the delete does
    (_, _, deleted), = _raw(run, by_manager[0], "d")
    gtid = deleted["source"]["gtid"]
    assert isinstance(gtid, str) and gtid.count("-") == 2
    messages = [_doc(r.value) for r in read_all(run["bootstrap"], MESSAGES)]
    mine = [m for m in messages if m.get("source", {}).get("gtid") == gtid]
    assert [(m["op"], m["after"], m["source"]["db"], m["source"]["table"]) for m in mine] == [
        ("c", {"principal": MANAGER}, "guard_admin", "principal_messages")] * 2
    # the attribution rows are audited as such and never reach a sanitized topic
    audits = [decode(r.value) for r in read_all(run["bootstrap"], run["audit"])]
    assert any(a["decision"] == "attribution" and gtid in (a["reason"] or "") and MANAGER in (a["reason"] or "")
               for a in audits)
    assert not read_all(run["bootstrap"], run["sanitized"] + MESSAGES)


def test_the_demo_workload_names_branch_0202_staff_and_every_write_is_allowed(run: dict[str, Any],
                                                                             stack: dict[str, str]) -> None:
    """`guard demo`'s workload on the MariaDB branch (run_workload with branch code 0202): a teller opens, another
    updates, the manager deletes; every change of customers, accounts, transactions and logins is allowed."""
    result = run_workload(stack["GUARD_BRANCH2_DSN"], customers=2, update=1, delete=1, branch_code="0202")
    opener, updater, deleter = BRANCH_STAFF["0202"]
    created, deleted = result.customers[0], result.deleted_customers[0]
    assert [d["detail"]["principal"] for d in _decisions(run, created, "c")] == [opener]
    assert [d["detail"]["principal"] for d in _decisions(run, created, "u")] == [updater]
    decisions = _decisions(run, deleted, "d")
    assert [(d["decision"], d["detail"]["principal"]) for d in decisions] == [("write_allowed", deleter)]
    # every write decision of the worker on the workload's customers, on every table, is an allow
    ids = set(result.customers)
    topics = {f"{PREFIX}.branch_0202.{t}" for t in ("customers", "accounts", "transactions", "customer_auth")}

    def positions() -> set[tuple[str, int, int]]:
        return {(t, r.partition, r.offset) for t in topics for r in read_all(run["bootstrap"], t)
                if (row := _doc(r.value).get("after") or _doc(r.value).get("before") or {})
                and row.get("customer_id") in ids and _doc(r.value).get("op") in ("c", "u", "d")}
    wanted = wait_until(lambda: len(p := positions()) >= 8 and p, timeout=120, what="the workload's raw changes")

    def decided() -> dict[tuple[str, int, int], str] | None:
        got = {(a["source_topic"], a["source_partition"], a["source_offset"]): write[0]
               for a in (decode(r.value) for r in read_all(run["bootstrap"], run["audit"]))
               if (write := write_decision_of(a)) is not None}
        return {w: got[w] for w in wanted} if all(w in got for w in wanted) else None
    found: dict[tuple[str, int, int], str] = wait_until(decided, timeout=180, what="the workload's decisions")
    assert set(found.values()) == {"write_allowed"}, found


def test_a_rolled_back_delete_leaves_no_change_and_no_attribution(run: dict[str, Any]) -> None:
    """The attribution row is part of the deleting transaction: rolled back with it, neither reaches the binlog."""
    branch = run["branch"]
    kept, marker = branch.insert(TELLER), branch.insert(TELLER)
    db = branch.db
    nobody_else = f"Staff:{unique('rollback-')}"  # named by this transaction only
    db.conn.begin()
    attribute(db, nobody_else)
    db.execute("DELETE FROM customers WHERE customer_id = %s", (kept,))
    db.conn.rollback()
    db.forget_principal()
    branch.delete([marker], MANAGER)  # committed after the rollback: once it is published, so would the rest be
    (_, _, after_it), = _raw(run, marker, "d")
    gtid = after_it["source"]["gtid"]
    assert not [r for r in read_all(run["bootstrap"], RAW) if _doc(r.value).get("op") == "d"
                and (_doc(r.value).get("before") or {}).get("customer_id") == kept]
    messages = [_doc(r.value) for r in read_all(run["bootstrap"], MESSAGES)]
    assert [m["after"] for m in messages if m["source"]["gtid"] == gtid] == [{"principal": MANAGER}]
    assert not [m for m in messages if m["after"] == {"principal": nobody_else}]


def test_the_application_cannot_write_an_attribution(stack: dict[str, str]) -> None:
    cfg = StackConfig.from_env()
    with MariaConnection(stack["GUARD_BRANCH2_DSN"]) as app:
        with pytest.raises(pymysql.err.OperationalError) as denied:
            app.execute("INSERT INTO guard_admin.principal_messages (principal) VALUES ('Staff:m0202-01')")
        assert denied.value.args[0] == 1142  # INSERT command denied
        # nor plant a trigger that would run as the guard's account: that takes SUPER (1419: with the binlog on,
        # creating any trigger does) or SET USER (1227), which the application account doesn't have
        with pytest.raises(pymysql.err.OperationalError) as planted:
            app.execute("CREATE DEFINER = 'guard_attribution'@'localhost' TRIGGER spoof AFTER INSERT ON customers "
                        "FOR EACH ROW INSERT INTO guard_admin.principal_messages (principal) VALUES ('x')")
        assert planted.value.args[0] in (1419, 1227)
        # nor remove the guard's triggers (with the binlog on, dropping a trigger takes SUPER too)
        with pytest.raises(pymysql.err.OperationalError) as dropped:
            app.execute("DROP TRIGGER customers_guard_principal_delete")
        assert dropped.value.args[0] == 1419
    server = MariaDB(cfg)
    # the table stores nothing (BLACKHOLE) and its definer can't log in
    assert server.admin("SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'guard_admin' "
                        "AND TABLE_NAME = 'principal_messages'").strip() == "BLACKHOLE"
    assert server.admin("SELECT COUNT(*) FROM guard_admin.principal_messages").strip() == "0"
    assert "ACCOUNT LOCK" in server.admin("SHOW CREATE USER 'guard_attribution'@'localhost'")


def test_a_stack_seeded_before_branch_0202_had_staff_gets_them(stack: dict[str, str]) -> None:
    """The staff directory (branch 0101's `public.staff`) of a stack seeded by an older version gains the members
    of staff the demo added since, at the next provisioning; rows already there are left as they are."""
    import psycopg

    from guard.stack.provision import SEED_PRINCIPAL, seed

    who = OTHER_TELLER.removeprefix("Staff:")
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('guard.principal', %s, true)", (SEED_PRINCIPAL,))
            conn.execute("DELETE FROM public.staff_roles WHERE staff_id = %s", (who,))
            conn.execute("DELETE FROM public.staff WHERE staff_id = %s", (who,))
        assert seed(StackConfig.from_env(), stack["GUARD_BRANCH_DSN"]) == 0  # already seeded: no customer rows
        assert conn.execute("SELECT s.branch_code, s.active, r.role FROM public.staff s JOIN public.staff_roles r "
                            "USING (staff_id) WHERE staff_id = %s", (who,)).fetchall() == [("0202", True, "teller")]
