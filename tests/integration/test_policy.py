"""Writes checked against the access policy on the real stack (issue 14, items 1, 2 and 4).

Staff of several roles write in the branch database (PostgreSQL → Debezium → Kafka); a guard worker (a real
`guard run` process, native hot path when installed) decides every change: allowed, denied (by role, by
branch, after a cut-off) or unattributed; deletes are attributed by the logical decoding message of their
transaction. Each decision is read back from the audit topic, with its policies; denied and unattributed
writes raise an anomaly and carry the decision in the sanitized record's `bg-policy` header. The policy is
reloaded without a restart, and a bad reload is refused with the running policy kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from guard.policy.engine import default_directory
from guard.policy.model import cedar_datetime
from guard.records.codec import decode, write_decision_of
from guard.workload.branch import next_customer_ids
from tests.integration.kafka_helpers import GuardProcess, kafka_conf, read_all
from tests.integration.reliability_helpers import unique, wait_until

pytestmark = pytest.mark.integration

RAW = "br0101.public.customers"

ACQUIRER = """
// test only: the acquiring bank's managers prepare a branch in transfer, until its cut-off
@id("acquirer-prepares-transfer")
permit (principal in BranchGuard::Role::"manager", action == BranchGuard::Action::"write", resource)
when { principal is BranchGuard::Staff && resource.branch == principal.branch &&
       resource.branch.transfer_state == "transferring" };
"""


def _bump(path: Path, text: str) -> None:
    """Write `text` with a modification time surely newer than the last (coarse file-system clocks)."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, max(st.st_mtime_ns, time.time_ns()) + 1_000_000_000))


def _set_branch(policy: Path, **attrs: Any) -> None:
    docs = json.loads((policy / "entities.json").read_text())
    for doc in docs:
        if doc["uid"] == {"type": "BranchGuard::Branch", "id": "0101"}:
            doc["attrs"].update(attrs)
    _bump(policy / "entities.json", json.dumps(docs))


class Branch:
    """The branch database, as its application uses it: each transaction names its principal."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def insert(self, principal: str | None) -> int:
        cid = next_customer_ids(self.conn, 1)[0]
        with self.conn.transaction():
            if principal is not None:
                self.conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))
            self.conn.execute("INSERT INTO customers (customer_id, name, mobile, branch_code) VALUES (%s, %s, %s, "
                              "'0101')", (cid, "测试客户", "13800138000"))
        return cid

    def update(self, cid: int, principal: str | None) -> None:
        with self.conn.transaction():
            if principal is not None:
                self.conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))
            self.conn.execute("UPDATE customers SET mobile = %s WHERE customer_id = %s", ("13900139000", cid))

    def delete(self, cid: int, principal: str | None) -> None:
        with self.conn.transaction():
            if principal is not None:
                self.conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))
            self.conn.execute("DELETE FROM customers WHERE customer_id = %s", (cid,))


@pytest.fixture(scope="module")
def run(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("policy")
    policy = tmp / "policy"
    shutil.copytree(default_directory(), policy)
    (policy / "acquirer.cedar").write_text(ACQUIRER)
    _set_branch(policy, transfer_state="transferring", cutoff=cedar_datetime(datetime(2099, 1, 1, tzinfo=UTC)))
    prefix = unique("pol")
    topics = {"audit": f"guard.audit.{prefix}", "anomalies": f"guard.anomalies.{prefix}",
              "sanitized": f"sanitized.{prefix}."}
    env = {"GUARD_POLICY_DIR": str(policy), "GUARD_POLICY_STAFF": "db", "GUARD_AUDIT_TOPIC": topics["audit"],
           "GUARD_ANOMALIES_TOPIC": topics["anomalies"], "GUARD_SANITIZED_PREFIX": topics["sanitized"],
           "GUARD_DLQ_TOPIC": f"guard.dlq.{prefix}", "GUARD_DELETIONS_TOPIC": f"guard.deletions.{prefix}",
           "GUARD_ATTRIBUTION_WAIT_S": "5"}
    worker = GuardProcess(stack, worker_id=unique("pw-"), group_id=unique("policy-"), log_dir=tmp, extra_env=env)
    worker.start(from_end=True)
    branch = Branch(stack["GUARD_BRANCH_DSN"])
    try:
        yield {"stack": stack, "policy": policy, "worker": worker, "branch": branch, **topics}
    finally:
        worker.stop()
        branch.conn.close()


def _doc(value: bytes | None) -> dict[str, Any]:
    """A raw record's JSON (empty for a tombstone or a value other tests wrote that isn't JSON)."""
    try:
        doc = orjson.loads(value) if value else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _raw_offset(bootstrap: str, cid: int, op: str) -> tuple[int, int]:
    """(partition, offset) of the raw change `op` of customer `cid` (waits for Debezium to publish it)."""
    def find() -> tuple[int, int] | None:
        for rec in read_all(bootstrap, RAW):
            doc = _doc(rec.value)
            row = doc.get("after") if op != "d" else doc.get("before")
            if doc.get("op") == op and row and row.get("customer_id") == cid:
                return rec.partition, rec.offset
        return None
    found: tuple[int, int] = wait_until(find, timeout=120, what=f"raw {op} of customer {cid}")
    return found


def _as_decision(audit: dict[str, Any]) -> dict[str, Any] | None:
    """An audit record as its write decision (None: it carries none): `decision` is the write decision's
    name, `detail` its JSON, `change` the change's own decision (audit format 2: one record per change)."""
    found = write_decision_of(audit)
    if found is None:
        return None
    return {**audit, "change": audit["decision"], "decision": found[0], "detail": found[1]}


def _decision(run: dict[str, Any], cid: int, op: str) -> dict[str, Any]:
    """The write decision audited for the change `op` of customer `cid` (its reason parsed)."""
    bootstrap = run["stack"]["GUARD_KAFKA_BOOTSTRAP"]
    partition, offset = _raw_offset(bootstrap, cid, op)

    def find() -> dict[str, Any] | None:
        for rec in read_all(bootstrap, run["audit"]):
            audit = decode(rec.value)
            if (audit["source_topic"] == RAW and audit["source_partition"] == partition
                    and audit["source_offset"] == offset and (found := _as_decision(audit)) is not None):
                assert audit["v"] == 2 and audit["subject"], "the change's own record carries its decision"
                return found
        return None
    try:
        found: dict[str, Any] = wait_until(find, timeout=180, what=f"the decision on {op} of {cid}")
    except AssertionError:
        print(run["worker"].log()[-4000:])
        raise
    return found


def _anomalies(run: dict[str, Any], rule: str) -> list[dict[str, Any]]:
    return [a for r in read_all(run["stack"]["GUARD_KAFKA_BOOTSTRAP"], run["anomalies"])
            if (a := orjson.loads(r.value))["rule"] == rule]


def _sanitized_headers(run: dict[str, Any], partition: int, offset: int) -> dict[str, bytes]:
    """Headers of the sanitized record of raw (partition, offset), found by the change's source position."""
    bootstrap = run["stack"]["GUARD_KAFKA_BOOTSTRAP"]
    raw = next(_doc(r.value) for r in read_all(bootstrap, RAW) if (r.partition, r.offset) == (partition, offset))
    position, op = f"lsn:{raw['source']['lsn']}", raw["op"]

    def find() -> dict[str, bytes] | None:
        for rec in read_all(bootstrap, run["sanitized"] + RAW):
            if rec.value is not None and rec.partition == partition:
                change = decode(rec.value)
                if change["position"] == position and change["op"] == op:
                    return dict(rec.headers or []) or {"none": b""}
        return None
    found: dict[str, bytes] = wait_until(find, timeout=60, what="the sanitized record")
    return found


def test_tellers_write_their_branch_and_others_are_denied(run: dict[str, Any]) -> None:
    branch = run["branch"]
    mine = branch.insert("Staff:t0101-01")
    branch.update(mine, "Staff:t0102-01")  # a teller of another branch
    branch.update(mine, "Staff:x0101-01")  # a teller who left
    allowed = _decision(run, mine, "c")
    assert allowed["decision"] == "write_allowed" and allowed["op"] == "c"
    assert allowed["detail"]["principal"] == "Staff:t0101-01"
    assert allowed["detail"]["policies"] == ["teller-writes-own-branch"]
    updates = [d for d in _all_decisions(run, mine, "u")]
    assert [d["detail"]["principal"] for d in updates] == ["Staff:t0102-01", "Staff:x0101-01"]
    other, gone = updates
    assert other["decision"] == "write_denied" and other["detail"]["policies"] == []
    assert "default deny" in other["detail"]["reason"]
    assert gone["decision"] == "write_denied" and gone["detail"]["policies"] == ["inactive-staff-do-nothing"]
    alerts = wait_until(lambda: [a for a in _anomalies(run, "write_denied")
                                 if a["source"]["offset"] in (other["source_offset"], gone["source_offset"])],
                        timeout=60, what="write_denied anomalies")
    assert len(alerts) == 2 and {a["principal"] for a in alerts} == {"Staff:t0102-01", "Staff:x0101-01"}
    headers = _sanitized_headers(run, other["source_partition"], other["source_offset"])
    assert json.loads(headers["bg-policy"])["decision"] == "deny"
    assert "bg-policy" not in _sanitized_headers(run, allowed["source_partition"], allowed["source_offset"])


def _all_decisions(run: dict[str, Any], cid: int, op: str) -> list[dict[str, Any]]:
    """Every audited write decision on changes `op` of customer `cid`, in raw-offset order."""
    bootstrap = run["stack"]["GUARD_KAFKA_BOOTSTRAP"]

    def offsets() -> list[tuple[int, int]]:
        found = []
        for rec in read_all(bootstrap, RAW):
            doc = _doc(rec.value)
            if doc.get("op") == op and (doc.get("after") or doc.get("before") or {}).get("customer_id") == cid:
                found.append((rec.partition, rec.offset))
        return found
    wanted = wait_until(lambda: len(offsets()) >= 2 and offsets(), timeout=120, what="raw updates")

    def find() -> list[dict[str, Any]] | None:
        audits = [decode(r.value) for r in read_all(bootstrap, run["audit"])]
        got = {(a["source_partition"], a["source_offset"]): d for a in audits if a["source_topic"] == RAW
               and (d := _as_decision(a)) is not None}
        if all(w in got for w in wanted):
            return [got[w] for w in sorted(wanted)]
        return None
    out: list[dict[str, Any]] = wait_until(find, timeout=180, what="update decisions")
    return out


def test_unattributed_writes_are_a_decision_and_an_alert(run: dict[str, Any]) -> None:
    cid = run["branch"].insert(None)  # no SET LOCAL guard.principal
    decision = _decision(run, cid, "c")
    assert decision["decision"] == "unattributed" and decision["detail"]["principal"] is None
    alerts = wait_until(lambda: [a for a in _anomalies(run, "write_unattributed")
                                 if a["source"]["offset"] == decision["source_offset"]
                                 and a["source"]["partition"] == decision["source_partition"]],
                        timeout=60, what="write_unattributed anomaly")
    assert alerts[0]["severity"] == "high"
    headers = _sanitized_headers(run, decision["source_partition"], decision["source_offset"])
    assert json.loads(headers["bg-policy"])["decision"] == "unattributed"


def test_deletes_are_attributed_by_their_transactions_message(run: dict[str, Any]) -> None:
    branch = run["branch"]
    by_manager, by_teller, by_nobody = (branch.insert("Staff:t0101-01") for _ in range(3))
    branch.delete(by_manager, "Staff:m0101-01")
    branch.delete(by_teller, "Staff:t0101-02")
    branch.delete(by_nobody, None)
    manager = _decision(run, by_manager, "d")
    assert manager["decision"] == "write_allowed" and manager["detail"]["action"] == "delete"
    assert manager["detail"]["principal"] == "Staff:m0101-01"
    assert manager["detail"]["policies"] == ["manager-writes-and-deletes-own-branch"]
    teller = _decision(run, by_teller, "d")
    assert teller["decision"] == "write_denied" and teller["detail"]["principal"] == "Staff:t0101-02"
    nobody = _decision(run, by_nobody, "d")
    assert nobody["decision"] == "unattributed"
    # the messages themselves are audited as attributions, never forwarded to a sanitized topic
    audits = [decode(r.value) for r in read_all(run["stack"]["GUARD_KAFKA_BOOTSTRAP"], run["audit"])]
    assert any(a["decision"] == "attribution" and "m0101-01" in (a["reason"] or "") for a in audits)


def test_cutoff_and_reload_without_restart(run: dict[str, Any]) -> None:
    branch, policy = run["branch"], run["policy"]
    before = branch.insert("Staff:b0101-01")  # the acquirer's manager, before the cut-off
    first = _decision(run, before, "c")
    assert first["decision"] == "write_allowed" and first["detail"]["policies"] == ["acquirer-prepares-transfer"]
    # the cut-off is now: reloaded by the running worker (entities.json changed), no restart
    _set_branch(policy, cutoff=cedar_datetime(time.time()))
    time.sleep(2.5)  # past the engine's check interval (1 s) and the decision bucket (1 s)
    after = branch.insert("Staff:b0101-01")
    late = _decision(run, after, "c")
    assert late["decision"] == "write_denied"
    assert late["detail"]["policies"] == ["nobody-outside-owner-after-cutoff"]
    # the owner's teller still writes after the cut-off
    owner = branch.insert("Staff:t0101-01")
    assert _decision(run, owner, "c")["decision"] == "write_allowed"
    assert "policy reloaded" in run["worker"].log()


def test_a_bad_reload_is_refused_and_the_running_policy_kept(run: dict[str, Any]) -> None:
    branch, policy = run["branch"], run["policy"]
    _bump(policy / "broken.cedar",
          '@id("broken")\npermit (principal, action, resource) when { principal.salary > 1 };\n')
    try:
        time.sleep(1.5)
        cid = branch.insert("Staff:t0101-01")
        decision = _decision(run, cid, "c")
        assert decision["decision"] == "write_allowed"
        assert decision["detail"]["policies"] == ["teller-writes-own-branch"]
        log = wait_until(lambda: "policy reload refused" in run["worker"].log() and run["worker"].log(),
                         timeout=30, what="the refusal in the worker's log")
        assert "broken" in log and run["worker"].alive()
    finally:
        (policy / "broken.cedar").unlink()


def _event(op: str, row: dict[str, Any], tx_id: int) -> bytes:
    now = int(time.time() * 1000)
    return orjson.dumps({"before": row if op == "d" else None, "after": None if op == "d" else row, "op": op,
                         "ts_ms": now, "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public",
                                                  "table": "customers", "lsn": now, "ts_ms": now, "txId": tx_id}})


def _message(principal: str | None, tx_id: int) -> bytes:
    import base64

    content = base64.b64encode(json.dumps({"principal": principal}).encode()).decode()
    now = int(time.time() * 1000)
    return orjson.dumps({"op": "m", "ts_ms": now, "message": {"prefix": "guard.principal", "content": content},
                         "source": {"connector": "postgresql", "db": "branch_0101", "lsn": now, "ts_ms": now,
                                    "txId": tx_id}})


def test_a_delete_read_before_its_message_waits_for_it_bounded(stack: dict[str, str], tmp_path: Path) -> None:
    """Records of different topics reach the worker in no guaranteed order: a delete met before the message
    of its transaction is held back (its partition sought back, nothing after it processed, nothing
    committed past it) until the message arrives; a delete whose message never comes is decided
    `unattributed` after `attribution_wait_s`, and the partition goes on in order."""
    from confluent_kafka import Producer

    from tests.integration.reliability_helpers import create_topic

    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    prefix = unique("polh")
    raw, messages = f"{prefix}.public.customers", f"{prefix}.message"
    create_topic(bootstrap, raw, 1)
    create_topic(bootstrap, messages, 1)
    audit = f"guard.audit.{prefix}"
    env = {"GUARD_RAW_TOPIC_PREFIX": prefix, "GUARD_SANITIZED_PREFIX": f"sanitized.{prefix}.",
           "GUARD_AUDIT_TOPIC": audit, "GUARD_ANOMALIES_TOPIC": f"guard.anomalies.{prefix}",
           "GUARD_DLQ_TOPIC": f"guard.dlq.{prefix}", "GUARD_DELETIONS_TOPIC": f"guard.deletions.{prefix}",
           "GUARD_POLICY_STAFF": "db", "GUARD_ATTRIBUTION_WAIT_S": "8",
           # keys of a branch of its own (the deletes erase these customers), the policy's branch 0101
           "GUARD_BRANCH": unique("ph"), "GUARD_POLICY_BRANCH": "0101"}
    waited_tx, lost_tx = (int.from_bytes(os.urandom(4), "big") + 2**40 for _ in range(2))
    first = 9_100_000 + int.from_bytes(os.urandom(2), "big") * 10
    row = {"customer_id": first + 1, "branch_code": "0101", "updated_by": "Staff:t0101-01"}
    producer = Producer(kafka_conf(bootstrap))
    for value in (_event("c", row, 1), _event("d", row, waited_tx), _event("c", dict(row, customer_id=first + 2), 2),
                  _event("d", dict(row, customer_id=first + 2), lost_tx),
                  _event("c", dict(row, customer_id=first + 3), 3)):
        producer.produce(raw, value, partition=0)
    assert producer.flush(30) == 0
    worker = GuardProcess(stack, worker_id=unique("ph-"), group_id=unique("policy-hold-"), log_dir=tmp_path,
                          extra_env=env).start()
    try:
        time.sleep(4)  # the worker meets the first delete without its message and holds it back
        assert not [r for r in read_all(bootstrap, audit) if decode(r.value)["source_offset"] >= 1
                    and decode(r.value)["source_topic"] == raw], "nothing at or after the held delete yet"
        producer.produce(messages, _message("Staff:m0101-01", waited_tx), partition=0)
        assert producer.flush(30) == 0

        def decisions() -> dict[int, dict[str, Any]] | None:
            got = {a["source_offset"]: d for r in read_all(bootstrap, audit) if (a := decode(r.value))["source_topic"]
                   == raw and (d := _as_decision(a)) is not None}
            return got if len(got) == 5 else None
        got: dict[int, dict[str, Any]] = wait_until(decisions, timeout=120, what="five decisions")
        details = {o: a["detail"] for o, a in got.items()}
        assert got[1]["decision"] == "write_allowed" and details[1]["principal"] == "Staff:m0101-01"
        assert details[1]["action"] == "delete"
        assert got[3]["decision"] == "unattributed" and "within 8 s" in details[3]["reason"]
        assert [got[o]["decision"] for o in (0, 2, 4)] == ["write_allowed"] * 3
        # every decision once (exactly once, although the held records were fetched several times)
        counted = [a["source_offset"] for r in read_all(bootstrap, audit) if (a := decode(r.value))["source_topic"]
                   == raw and _as_decision(a) is not None]
        assert sorted(counted) == [0, 1, 2, 3, 4]
        # one audit record per change: no second record at a source offset
        changes = [a["source_offset"] for r in read_all(bootstrap, audit) if (a := decode(r.value))["source_topic"]
                   == raw and a["op"] in ("c", "u", "d")]
        assert sorted(changes) == [0, 1, 2, 3, 4]
    finally:
        worker.stop()
    assert '"attribution_waits":' in worker.log() and '"attribution_waits":0' not in worker.log()


def test_the_key_store_records_and_looks_up_a_batchs_attributions_in_one_round_trip(stack: dict[str, str]) -> None:
    """`exchange_attributions` on the stack's Redis (the guard's ACL user over TLS): the batch's messages are
    recorded before its deletes are looked up, in one request, with the attribution TTL, and read back by
    the single lookup other workers use."""
    from guard.keys.store import ATTRIBUTION_TTL_S, RedisKeyStore

    store = RedisKeyStore(stack["GUARD_REDIS_URL"], "demo-bank", password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    branch = unique("pa")
    mine, other, unknown = 9_001, "0-202-77", 9_002
    before = store.round_trips
    found = store.exchange_attributions(branch, [(mine, "Staff:m0101-01"), (other, "")], [mine, unknown, other])
    assert store.round_trips == before + 1
    assert found == {mine: {"Staff:m0101-01"}, other: {""}}  # a message naming nobody is still a message
    assert store.attributions(branch, [mine, unknown]) == {mine: {"Staff:m0101-01"}}
    assert 0 < store.client.ttl(store._k("attrib", branch, str(mine))) <= ATTRIBUTION_TTL_S
    assert store.exchange_attributions(branch, [], []) == {}  # nothing to exchange: no request
    assert store.round_trips == before + 2  # the exchange and the lookup
