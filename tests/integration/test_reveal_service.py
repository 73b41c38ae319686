"""The reveal service on the real stack: `guard reveal serve` as a process, the real Cedar engine and policy
files, records sanitized by a real `guard run` worker from the branch database through Debezium.

Principals (Staff entities of a test copy of the demo policy directory: the real schema and policies, the
real entities plus these staff members): `m0101` manager of branch 0101, `t0101` teller of 0101, `m0102`
manager of branch 0102, `r0101` a manager used only by the rate-limit test, `s0101` one used only by the
search budget's test. Every call's audit record is
read back from `guard.audit` (by request id) and checked: decision, fields asked and given, principal,
purpose, policies. No test output carries a value: mismatches name fields.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from guard.audit.chain import LEAF_HEADER, parse_prefix
from guard.config import load_settings
from guard.keys.store import RedisKeyStore
from guard.pipeline.runtime import build_keys
from guard.policy.engine import default_directory
from guard.policy.sources import staff_entities
from guard.records.codec import decode
from guard.reveal.client import Ref, RevealClient, RevealError
from guard.reveal.tokens import TokenStore, load_token_key
from guard.workload.branch import run_workload
from tests.integration.kafka_helpers import GUARD, REPO, GuardProcess, high_watermark, kafka_conf, wait_for

pytestmark = pytest.mark.integration

CUSTOMERS = "sanitized.br0101.public.customers"
AUTH = "sanitized.br0101.public.customer_auth"
RATE_LIMIT = 30
#: Searched values per principal per hour (`reveal_search_rate_limit`; the default is 100).
SEARCH_RATE_LIMIT = 10
#: Per run: rate windows and tokens of earlier runs (same Redis) don't count against this one.
RUN = uuid.uuid4().hex[:6]
ROLES = {"m0101": ("0101", "manager"), "t0101": ("0101", "teller"), "m0102": ("0102", "manager"),
         "r0101": ("0101", "manager"), "b0101": ("0101", "manager"), "c0101": ("0101", "compliance"),
         "p0101": ("0101", "manager"), "s0101": ("0101", "manager")}


def principal(who: str) -> str:
    """The Cedar principal of a test's member of staff (`Staff::m0101-<run>`)."""
    return f"Staff::{who}-{RUN}"


STAFF = staff_entities([(f"{who}-{RUN}", branch, "bank-a", True, [role]) for who, (branch, role) in ROLES.items()])


def _store(env: dict[str, str]) -> RedisKeyStore:
    """The key store as the guard's Redis user sees it: the deployment's tenant, its key prefix."""
    return RedisKeyStore(env["GUARD_REDIS_URL"], load_settings().tenant)


def _reveal_kafka_env() -> dict[str, str]:
    """The reveal service runs as its own Kafka principal (`reveal`: read sanitized.*, write guard.audit)."""
    from guard.stack.config import StackConfig

    return StackConfig.from_env().kafka_env("reveal")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The running service, its tokens, the records it is asked about, and the audit topic's start."""

    def __init__(self, url: str, tokens: dict[str, str], env: dict[str, str], audit_start: list[TopicPartition],
                 customers: dict[int, Any], auth: dict[int, Any], dsn: str, token_key_file: Path,
                 policy: Path) -> None:
        self.url, self.tokens, self.env = url, tokens, env
        self.audit_start = audit_start
        self.customers, self.auth, self.dsn = customers, auth, dsn
        self.token_key_file = token_key_file
        self.policy = policy

    def client(self, who: str) -> RevealClient:
        return RevealClient(self.url, self.tokens[who])

    def audit(self, request_id: str, *, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The audit records of one call (by request id, the audit record's trace id), decoded."""
        consumer = Consumer({**kafka_conf(self.env["GUARD_KAFKA_BOOTSTRAP"]), "group.id": "unused",
                             "enable.auto.commit": False, "isolation.level": "read_committed"})
        found: list[dict[str, Any]] = []
        try:
            consumer.assign(self.audit_start)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and len(found) < count:
                msg = consumer.poll(0.5)
                if msg is None or msg.error() or msg.value() is None:
                    continue
                doc = decode(msg.value())
                if doc.get("trace_id") == request_id:
                    found.append({**doc, "_key": (msg.key() or b"").decode(),
                                  "_leaf": (dict(msg.headers() or []).get(LEAF_HEADER) or b"").hex()})
        finally:
            consumer.close()
        assert len(found) == count, f"{len(found)} audit records of request {request_id}, {count} expected"
        # Every call's records are leaves of an audit chain (docs/audit.md), or `guard audit verify` would
        # report them as inserted.
        assert all(doc["_leaf"] for doc in found), f"audit records of request {request_id} carry no {LEAF_HEADER}"
        return found


@pytest.fixture(scope="module")
def served(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("reveal")
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    # The demo policy directory as shipped, plus the test's staff (policy_staff = file).
    policy = tmp / "policy"
    shutil.copytree(default_directory(), policy)
    entities = json.loads((policy / "entities.json").read_text())
    (policy / "entities.json").write_text(json.dumps(entities + STAFF))
    token_key_file = tmp / "reveal-token.key"
    # Where the audit topic is now: the test reads its calls' records from here on.
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": "unused"})
    try:
        meta = consumer.list_topics("guard.audit", timeout=10).topics["guard.audit"]
        audit_start = [TopicPartition("guard.audit", p, high_watermark(consumer, "guard.audit", p))
                       for p in meta.partitions]
    finally:
        consumer.close()
    # Records to reveal: a workload through Debezium and a real worker.
    group = f"reveal-{uuid.uuid4().hex[:8]}"
    worker = GuardProcess(stack, worker_id=f"{group}-w1", group_id=group, log_dir=tmp).start(from_end=True)
    result = run_workload(stack["GUARD_BRANCH_DSN"], customers=3, update=0, delete=0, seed=7_000 + os.getpid())
    ids = set(result.customers)

    def latest(topic: str) -> dict[int, Any]:
        recs = wait_for(bootstrap, topic, lambda rs: ids <= {orjson.loads(r.key)["customer_id"] for r in rs
                                                             if r.key and r.value}, timeout=180)
        return {orjson.loads(r.key)["customer_id"]: r for r in recs if r.key and r.value
                and orjson.loads(r.key)["customer_id"] in ids}

    try:
        customers, auth = latest(CUSTOMERS), latest(AUTH)
    finally:
        worker.stop()
    port = int(os.environ.get("GUARD_REVEAL_PORT") or _free_port())
    env = {**os.environ, **stack, **_reveal_kafka_env(), "GUARD_REVEAL_TOKEN_KEY_FILE": str(token_key_file),
           "GUARD_REVEAL_RATE_LIMIT": str(RATE_LIMIT), "GUARD_REVEAL_SEARCH_RATE_LIMIT": str(SEARCH_RATE_LIMIT),
           "GUARD_POLICY_STAFF": "file"}
    # One token through the command line (printed once, only its keyed hash stored), the others in-process.
    out = subprocess.run([*GUARD, "reveal", "token", "create", "--principal", principal("m0101"), "--policy",
                          str(policy)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    tokens = {"m0101": out.stdout.strip()}
    store = TokenStore(_store(stack), load_token_key(token_key_file))
    for who in ROLES:
        tokens.setdefault(who, store.create(principal(who))[0])
    proc, url = _start(env, port, policy, tmp / "reveal.log")
    try:
        yield Served(url, tokens, env, audit_start, customers, auth, stack["GUARD_BRANCH_DSN"], token_key_file,
                     policy)
    finally:
        _stop(proc, tmp / "reveal.log")


def _start(env: dict[str, str], port: int, policy: Path, log_path: Path, *, scheme: str = "http",
           verify: Any = True) -> tuple[subprocess.Popen[bytes], str]:
    """`guard reveal serve` as a process, once it answers /healthz."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*GUARD, "reveal", "serve", "--port", str(port), "--policy", str(policy)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(url + "/healthz", timeout=2, verify=verify).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(proc, log_path)
            raise AssertionError("the reveal service did not answer in 120 s")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(log_path.read_text(errors="replace")[-3000:])


def _ref(rec: Any, fields: list[str], image: str = "after") -> Ref:
    return Ref(rec.topic, rec.partition, rec.offset, fields, image)


def _reason(audit: dict[str, Any]) -> dict[str, Any]:
    return dict(orjson.loads(audit["reason"]))


def _db_row(dsn: str, customer: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT name, mobile, customer_id, gender FROM customers WHERE customer_id = %s",
                           (customer,))
        row = cur.fetchone()
        assert row is not None
        return dict(zip([d.name for d in cur.description or []], row, strict=True))


def test_a_calls_audit_records_are_a_checkpointed_chain(served: Served) -> None:
    """A call's audit records are a chain of their own, checkpointed in the same write: the signed note is on
    the audit topic (key = chain id) and in the second store outside Kafka (docs/audit.md)."""
    _, rec = next(iter(served.customers.items()))
    with served.client("m0101") as client:
        answer = client.reveal("kyc_review", [_ref(rec, ["name"])])
    assert answer.status == 200
    [audit] = served.audit(answer.request_id)
    leaf = parse_prefix(bytes.fromhex(audit["_leaf"]))
    assert leaf.chain.startswith("audit/cli:reveal-") and leaf.seq == 0
    kept = _store(served.env).audit_checkpoints("guard.audit")
    assert f"{leaf.chain} 1" in kept, "the call's checkpoint is not in the second store"
    consumer = Consumer({**kafka_conf(served.env["GUARD_KAFKA_BOOTSTRAP"]), "group.id": "unused",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    notes = []
    try:
        consumer.assign(served.audit_start)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not notes:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error() and msg.key() == leaf.chain.encode():
                notes.append(decode(msg.value())["reason"])
    finally:
        consumer.close()
    assert notes == [kept[f"{leaf.chain} 1"]], (
        "the topic's checkpoint differs from the second store's" if notes else
        f"the call's checkpoint not read in 60 s ({_uncommitted_view(served, leaf.chain)})")


def _uncommitted_view(served: Served, chain: str) -> str:
    """Whether a read_uncommitted reader sees the chain's checkpoint, and each audit partition's last stable
    offset against its end: tells a record never written from one held back by another producer's open
    transaction (a failure message, so a rare failure explains itself)."""
    consumer = Consumer({**kafka_conf(served.env["GUARD_KAFKA_BOOTSTRAP"]), "group.id": "unused",
                         "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
    seen, deadline = False, time.monotonic() + 20
    try:
        consumer.assign(served.audit_start)
        while time.monotonic() < deadline and not seen:
            msg = consumer.poll(0.5)
            seen = msg is not None and not msg.error() and msg.key() == chain.encode()
        ends = [high_watermark(consumer, "guard.audit", tp.partition) for tp in served.audit_start]
    finally:
        consumer.close()
    committed = Consumer({**kafka_conf(served.env["GUARD_KAFKA_BOOTSTRAP"]), "group.id": "unused",
                          "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:  # a read_committed consumer's latest offset is the last stable offset
        marks = [f"p{tp.partition}: from {tp.offset}, stable {high_watermark(committed, 'guard.audit', tp.partition)}"
                 f", end {end}" for tp, end in zip(served.audit_start, ends, strict=True)]
    finally:
        committed.close()
    return f"read_uncommitted sees it: {seen}; {', '.join(marks)}"


def test_allowed_reveal_returns_exactly_the_asked_fields_matching_the_source(served: Served) -> None:
    cid, rec = next(iter(served.customers.items()))
    with served.client("m0101") as client:
        answer = client.reveal("kyc_review", [_ref(rec, ["name", "mobile", "customer_id", "gender"])])
    assert answer.status == 200
    [res] = answer.results
    assert res["decision"] == "allowed" and res["refused"] == {}
    assert set(res["fields"]) == {"name", "mobile", "customer_id", "gender"}
    want = _db_row(served.dsn, cid)
    differ = [f for f in want if res["fields"][f] != want[f]]
    assert not differ, f"revealed fields differ from the branch database: {differ}"
    [audit] = served.audit(answer.request_id)
    why = _reason(audit)
    assert audit["op"] == "reveal" and audit["decision"] == "reveal_allowed"
    assert audit["worker"].startswith("reveal@")
    assert audit["_key"] == "reveal:0101" and audit["branch"] == "0101"
    assert (audit["source_topic"], audit["source_partition"], audit["source_offset"]) == (
        rec.topic, rec.partition, rec.offset)
    assert audit["table"] == "public.customers" and audit["subject"] == decode(rec.value)["subject"]
    assert why["principal"] == principal("m0101") and why["purpose"] == "kyc_review" and why["action"] == "reveal"
    assert why["asked"] == ["name", "mobile", "customer_id", "gender"] and why["given"] == why["asked"]
    assert "manager-reveals-c2-for-service" in why["policies"]
    assert audit["actions"] == {"asked": 4, "given": 4} and audit["classes"] == {"C1": 2, "C2": 2}
    assert want["mobile"] not in orjson.dumps(audit).decode()  # the audit names fields, never values


def test_wrong_purpose_is_refused_and_audited(served: Served) -> None:
    rec = next(iter(served.customers.values()))
    with served.client("m0101") as client:
        answer = client.reveal("curiosity", [_ref(rec, ["mobile"])])
    assert answer.status == 403
    [res] = answer.results
    assert res["decision"] == "denied" and res["fields"] == {} and res["refused"] == {"mobile": "policy"}
    [audit] = served.audit(answer.request_id)
    why = _reason(audit)
    assert audit["decision"] == "reveal_denied" and why["purpose"] == "curiosity"
    assert why["asked"] == ["mobile"] and why["given"] == [] and why["refused"] == {"mobile": "policy"}


def test_fields_outside_the_principals_classes_are_refused(served: Served) -> None:
    """A teller gets no C2 field; C3 is never revealed, not even to a manager; C1 of the same call is."""
    rec = next(iter(served.customers.values()))
    with served.client("t0101") as client:
        teller = client.reveal("kyc_review", [_ref(rec, ["mobile", "name"])])
    assert teller.status == 403 and teller.results[0]["refused"] == {"mobile": "policy", "name": "policy"}
    [audit] = served.audit(teller.request_id)
    assert audit["decision"] == "reveal_denied"
    assert "c2-reveal-needs-manager-or-compliance" in _reason(audit)["policies"]
    assert _reason(audit)["principal"] == principal("t0101")

    auth = next(iter(served.auth.values()))
    with served.client("m0101") as client:
        manager = client.reveal("kyc_review", [_ref(auth, ["login_name", "password_hash", "query_pin"])])
    assert manager.status == 200
    [res] = manager.results
    assert res["decision"] == "partial" and set(res["fields"]) == {"login_name"}
    assert res["refused"] == {"password_hash": "policy", "query_pin": "policy"}
    assert "c3-never-revealed" in res["policies"]
    [audit] = served.audit(manager.request_id)
    why = _reason(audit)
    assert audit["decision"] == "reveal_partial" and why["given"] == ["login_name"]
    assert why["refused"] == {"password_hash": "policy", "query_pin": "policy"}
    assert "c3-never-revealed" in why["policies"] and audit["classes"] == {"C2": 1, "C3": 2}
    # which policy decided which class: a partial reveal's record says it per class
    assert why["decisions"] == {
        "C2": {"decision": "allow", "policies": ["manager-reveals-c2-for-service"],
               "reason": "permitted by manager-reveals-c2-for-service"},
        "C3": {"decision": "deny", "policies": ["c3-never-revealed"], "reason": "forbidden by c3-never-revealed"}}


def test_other_branches_records_are_refused(served: Served) -> None:
    rec = next(iter(served.customers.values()))
    with served.client("m0102") as client:
        answer = client.reveal("kyc_review", [_ref(rec, ["mobile"])])
    assert answer.status == 403 and answer.results[0]["refused"] == {"mobile": "policy"}
    [audit] = served.audit(answer.request_id)
    assert audit["decision"] == "reveal_denied" and audit["branch"] == "0101"
    assert _reason(audit)["principal"] == principal("m0102") and _reason(audit)["given"] == []


def test_unknown_and_missing_tokens_are_refused_and_audited(served: Served) -> None:
    rec = next(iter(served.customers.values()))
    forged = "bgr_0000abcd_" + "A" * 43
    with RevealClient(served.url, forged) as client, pytest.raises(RevealError) as err:
        client.reveal("kyc_review", [_ref(rec, ["mobile"])])
    assert err.value.status == 401 and err.value.code == "unauthenticated" and err.value.request_id
    assert forged not in str(err.value)
    [audit] = served.audit(err.value.request_id)
    assert audit["op"] == "reveal" and audit["decision"] == "reveal_denied"
    assert _reason(audit)["reason"] == "unknown_token" and _reason(audit)["principal"] is None
    assert _reason(audit)["client"] == "127.0.0.1"
    # an expired token and a revoked token are unknown tokens
    store = TokenStore(_store(served.env), load_token_key(served.token_key_file))
    expired, _ = store.create(principal("m0101"), ttl_s=60, now_ms=int(time.time() * 1000) - 120_000)
    with RevealClient(served.url, expired) as client, pytest.raises(RevealError) as err:
        client.reveal("kyc_review", [_ref(rec, ["gender"])])
    assert err.value.status == 401
    token, info = store.create(principal("m0101"))
    with RevealClient(served.url, token) as client:
        assert client.reveal("kyc_review", [_ref(rec, ["gender"])]).status == 200
        assert store.revoke(token_id=info.id) == 1
        with pytest.raises(RevealError) as err:
            client.reveal("kyc_review", [_ref(rec, ["gender"])])
    assert err.value.status == 401
    missing = httpx.post(served.url + "/v1/reveal", json={"purpose": "kyc_review", "records": []}, timeout=30)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    [audit] = served.audit(missing.headers["X-Request-Id"])
    assert _reason(audit)["reason"] == "no_token"


def test_rate_limit_counts_records_and_refuses_the_excess(served: Served) -> None:
    recs = list(served.customers.values())
    refs = [_ref(recs[i % len(recs)], ["gender"]) for i in range(20)]
    with served.client("r0101") as client:
        first = client.reveal("kyc_review", refs)
        assert first.status == 200 and all(r["decision"] == "allowed" for r in first.results)
        with pytest.raises(RevealError) as err:  # 20 + 11 records > 30 in the window
            client.reveal("kyc_review", refs[:11])
        assert err.value.status == 429 and err.value.code == "rate_limited" and err.value.retry_after_s
        assert client.reveal("kyc_review", refs[:10]).status == 200  # exactly the limit is still allowed
        with pytest.raises(RevealError) as searched:  # searches share the budget, one per value
            client.search("customer_service", "public.customers", "mobile", ["0"])
        assert searched.value.status == 429
    audits = served.audit(err.value.request_id, count=11)
    assert {a["decision"] for a in audits} == {"reveal_denied"}
    assert {_reason(a)["why"] for a in audits} == {"rate_limited"}
    assert {_reason(a)["principal"] for a in audits} == {principal("r0101")}
    assert len(served.audit(first.request_id, count=20)) == 20


def test_search_has_a_budget_of_its_own_and_reveals_still_pass(served: Served) -> None:
    """A masked mobile (`138****1234`) and its blind index let a searcher confirm the 10^4 candidates of the
    hidden digits; the budget shared with reveal let them through in 17 minutes. Search now has its own,
    much smaller budget (here 10 values an hour), counted apart by the real script: the value past it is
    refused and audited, while the same principal's reveals, within the shared budget, still pass."""
    rec = next(iter(served.customers.values()))
    with served.client("s0101") as client:
        tokens = client.search("customer_service", "public.customers", "mobile",
                               [f"138{n:04d}1234" for n in range(SEARCH_RATE_LIMIT)])
        assert len(tokens) == SEARCH_RATE_LIMIT
        with pytest.raises(RevealError) as err:
            client.search("customer_service", "public.customers", "mobile", [f"138{SEARCH_RATE_LIMIT:04d}1234"])
        assert err.value.status == 429 and err.value.code == "rate_limited" and err.value.retry_after_s
        assert "search rate limit" in err.value.detail
        assert client.reveal("kyc_review", [_ref(rec, ["gender"])]).status == 200
    [audit] = served.audit(err.value.request_id)
    assert audit["op"] == "search" and audit["decision"] == "search_denied"
    why = _reason(audit)
    assert (why["why"], why["budget"], why["principal"]) == ("rate_limited", "search-rate", principal("s0101"))


def test_search_returns_the_blind_index_token(served: Served) -> None:
    cid, rec = next(iter(served.customers.items()))
    mobile = _db_row(served.dsn, cid)["mobile"]
    with served.client("t0101") as client:
        tokens = client.search("customer_service", "public.customers", "mobile", [mobile])
    assert tokens == [decode(rec.value)["after"]["index"]["mobile"]]
    with served.client("m0101") as client, pytest.raises(RevealError) as err:
        client.search("marketing", "public.customers", "mobile", [mobile])
    assert err.value.status == 403 and mobile not in str(err.value) and err.value.detail
    [audit] = served.audit(err.value.request_id)
    assert audit["op"] == "search" and audit["decision"] == "search_denied" and _reason(audit)["asked"] == ["mobile"]
    assert mobile not in orjson.dumps(audit).decode()


def test_errors_never_echo_values(served: Served) -> None:
    cid, rec = next(iter(served.customers.items()))
    mobile = _db_row(served.dsn, cid)["mobile"]
    auth = {"Authorization": f"Bearer {served.tokens['m0101']}"}
    bad = [
        {"purpose": "kyc_review", "records": [{"topic": rec.topic, "partition": 0, "offset": 0,
                                               "fields": [f"mobile={mobile}"]}]},
        {"purpose": mobile, "records": []},
        {"purpose": "kyc_review", "records": [{"topic": mobile, "partition": 0, "offset": 0, "fields": ["x"],
                                               mobile: 1}]},
    ]
    for body in bad:
        resp = httpx.post(served.url + "/v1/reveal", json=body, headers=auth, timeout=30)
        assert resp.status_code == 422 and mobile not in resp.text, resp.status_code
    # a search for a column without a blind index: refused, the value not repeated
    resp = httpx.post(served.url + "/v1/search", headers=auth, timeout=30, json={
        "purpose": "customer_service", "table": "public.customers", "column": "address", "values": [mobile]})
    assert resp.status_code == 403 and mobile not in resp.text
    # a topic outside the sanitized prefix is refused as such (the raw topic is never read)
    with served.client("m0101") as client:
        raw = client.reveal("kyc_review", [Ref("br0101.public.customers", 0, 0, ["mobile"])])
    assert raw.status == 403 and raw.results[0]["reason"] == "topic_not_allowed" and mobile not in str(raw)
    # a body over the limit is refused before it is parsed
    resp = httpx.post(served.url + "/v1/reveal", headers=auth, timeout=30,
                      content=b'{"purpose": "' + mobile.encode() * 10_000 + b'"}')
    assert resp.status_code == 413 and mobile not in resp.text


def test_the_token_is_checked_before_the_body_and_every_answer_has_a_request_id(served: Served) -> None:
    """An unauthenticated call with malformed JSON is answered 401 and audited (it was 422 and unaudited: the
    body was parsed before the token was checked); a 422 and a 413 carry `X-Request-Id`; an integer search
    value beyond 64 bits is refused with 422 (it was a 500 without an audit record)."""
    malformed = b'{"purpose": "kyc_review", "records": ['
    json_type = {"Content-Type": "application/json"}
    resp = httpx.post(served.url + "/v1/reveal", content=malformed, headers=json_type, timeout=30)
    assert resp.status_code == 401 and resp.json()["error"] == "unauthenticated"
    [audit] = served.audit(resp.headers["X-Request-Id"])
    assert audit["decision"] == "reveal_denied" and _reason(audit)["reason"] == "no_token"
    auth = {"Authorization": f"Bearer {served.tokens['t0101']}"}
    invalid = httpx.post(served.url + "/v1/reveal", content=malformed, headers={**auth, **json_type}, timeout=30)
    assert invalid.status_code == 422 and invalid.headers["X-Request-Id"] == invalid.json()["request_id"]
    too_large = httpx.post(served.url + "/v1/reveal", content=b"x" * 70_000, headers=auth, timeout=30)
    assert too_large.status_code == 413 and too_large.headers["X-Request-Id"]
    beyond = httpx.post(served.url + "/v1/search", headers=auth, timeout=30, json={
        "purpose": "customer_service", "table": "public.customers", "column": "mobile", "values": [10**30]})
    assert beyond.status_code == 422 and beyond.headers["X-Request-Id"] and str(10**30) not in beyond.text


def test_tokens_are_stored_only_as_keyed_hashes(served: Served) -> None:
    store = _store(served.env)
    raw = store.client.hgetall(store.name("reveal", "tokens"))
    assert len(raw) >= len(served.tokens)
    stored = b"".join(k + v for k, v in raw.items())
    for token in served.tokens.values():
        secret = token.split("_", 2)[2]  # bgr_<id>_<secret>; the secret itself may contain "_"
        assert len(secret) == 43 and token.encode() not in stored and secret.encode() not in stored
    assert oct(served.token_key_file.stat().st_mode & 0o777) == "0o600"


def test_token_cli_lists_without_secrets_and_revokes(served: Served) -> None:
    store = TokenStore(_store(served.env), load_token_key(served.token_key_file))
    token, info = store.create(principal("cli0101"), ttl_s=3600)
    listed = subprocess.run([*GUARD, "reveal", "token", "list"], cwd=REPO, env=served.env, capture_output=True,
                            text=True, timeout=120, check=True).stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith(info.id))
    assert principal("cli0101") in line and "expires 20" in line
    assert token not in listed and token.split("_", 2)[2] not in listed
    revoked = subprocess.run([*GUARD, "reveal", "token", "revoke", "--principal", principal("cli0101")], cwd=REPO,
                             env=served.env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "revoked 1 token" in revoked and store.verify(token) is None


def test_openapi_document_is_served(served: Served) -> None:
    doc = httpx.get(served.url + "/openapi.json", timeout=30).json()
    assert {"/v1/reveal", "/v1/search"} <= set(doc["paths"])
    schemes = doc["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    reveal_in = doc["components"]["schemas"]["RevealIn"]["properties"]["records"]
    assert reveal_in["maxItems"] == 100


def test_a_position_without_a_record_is_not_found(served: Served) -> None:
    """A reference names a position; the service reads the record itself, so an offset that holds another
    table's record or nothing at all gives that record's fields or `not_found`, never a guess."""
    rec = next(iter(served.customers.values()))
    with served.client("m0101") as client:
        gone = client.reveal("kyc_review", [Ref(rec.topic, rec.partition, 10**12, ["mobile"])])
    assert gone.status == 404 and gone.results[0]["decision"] == "not_found"
    [audit] = served.audit(gone.request_id)
    assert audit["decision"] == "reveal_not_found" and _reason(audit)["given"] == []


def test_the_service_opens_what_a_data_key_reader_opens(served: Served) -> None:
    """The service and a data-key-only reader agree (the service holds no other key than the guard's)."""
    from guard.protect.reveal import open_image

    keys = build_keys(load_settings(None, redis_url=served.env["GUARD_REDIS_URL"]), listen=False, indexes=False)
    rec = next(iter(served.customers.values()))
    opened = open_image(keys, decode(rec.value), "after", topic=rec.topic, row_key=rec.key)
    with served.client("m0101") as client:
        answer = client.reveal("kyc_review", [_ref(rec, ["email", "address"])])
    assert answer.results[0]["fields"] == {"email": opened["email"], "address": opened["address"]}


def test_bulk_reveals_need_compliance(served: Served) -> None:
    """policy/reveal.cedar: more than 20 records in one call only for compliance (volume in the context)."""
    recs = list(served.customers.values())
    refs = [_ref(recs[i % len(recs)], ["mobile"]) for i in range(21)]
    with served.client("b0101") as client:
        manager = client.reveal("kyc_review", refs)
    assert manager.status == 403
    assert all(r["refused"] == {"mobile": "policy"} for r in manager.results)
    assert all("bulk-reveal-needs-compliance" in r["policies"] for r in manager.results)
    with served.client("c0101") as client:
        compliance = client.reveal("aml_investigation", refs)
    assert compliance.status == 200 and all(r["decision"] == "allowed" for r in compliance.results)
    audits = served.audit(manager.request_id, count=21)
    assert all("bulk-reveal-needs-compliance" in _reason(a)["policies"] for a in audits)


def test_policy_changes_apply_without_restart_and_a_bad_reload_is_refused(served: Served) -> None:
    rec = next(iter(served.customers.values()))
    extra, broken = served.policy / "zz-test.cedar", served.policy / "zz-broken.cedar"

    def decision(client: RevealClient) -> tuple[str, list[str]]:
        res = client.reveal("kyc_review", [_ref(rec, ["gender"])]).results[0]
        return res["decision"], res["policies"]

    try:
        with served.client("p0101") as client:
            assert decision(client)[0] == "allowed"
            paused = principal("p0101").removeprefix("Staff::")
            extra.write_text(f'@id("test-p0101-paused")\nforbid (principal == BranchGuard::Staff::"{paused}", '
                             'action == BranchGuard::Action::"reveal", resource);\n')
            deadline = time.monotonic() + 60
            while decision(client) != ("denied", ["test-p0101-paused"]):
                assert time.monotonic() < deadline, "the policy change did not take effect"
                time.sleep(1)
            broken.write_text("permit (principal, action, resource) when { this is not cedar };\n")
            time.sleep(3)  # the engine looks at the directory at most every second
            assert decision(client) == ("denied", ["test-p0101-paused"])  # the running policy stays
            broken.unlink()
            extra.unlink()
            deadline = time.monotonic() + 60
            while decision(client)[0] != "allowed":
                assert time.monotonic() < deadline, "removing the policy did not take effect"
                time.sleep(1)
    finally:
        for path in (extra, broken):
            path.unlink(missing_ok=True)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), made here with `cryptography`."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reveal-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "reveal.crt", tmp / "reveal.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_https_and_no_plaintext_without_its_audit_record(served: Served, tmp_path: Path) -> None:
    """A second service with a certificate (HTTPS) whose audit topic can't be written (an illegal topic
    name): the call is answered 503 `audit_unavailable` and carries no value."""
    cert, key = _self_signed(tmp_path)
    env = {**served.env, "GUARD_REVEAL_TLS_CERT": str(cert), "GUARD_REVEAL_TLS_KEY": str(key),
           "GUARD_AUDIT_TOPIC": "guard audit (unwritable)"}
    trust = ssl.create_default_context(cafile=str(cert))
    proc, url = _start(env, _free_port(), served.policy, tmp_path / "tls.log", scheme="https", verify=trust)
    try:
        assert url.startswith("https://")
        with pytest.raises(httpx.HTTPError):  # nobody speaks plain HTTP to it
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)
        cid, rec = next(iter(served.customers.items()))
        mobile = _db_row(served.dsn, cid)["mobile"]
        with RevealClient(url, served.tokens["m0101"], verify=trust) as client, \
                pytest.raises(RevealError) as err:
            client.reveal("kyc_review", [_ref(rec, ["mobile"])])
        assert err.value.status == 503 and err.value.code == "audit_unavailable"
        assert mobile not in str(err.value) and mobile not in err.value.detail
    finally:
        _stop(proc, tmp_path / "tls.log")


def test_sliding_window_refuses_twice_the_limit_across_a_window_boundary(served: Served) -> None:
    from guard.reveal.ratelimit import RateLimiter

    limiter = RateLimiter(_store(served.env), limit=10, window_s=60)
    who = f"Staff::rl{uuid.uuid4().hex[:8]}"
    start = (time.time() // 60 + 1) * 60  # a window boundary
    assert limiter.hit(who, 10, now=start - 1).allowed  # the whole limit at the end of one window
    late = limiter.hit(who, 1, now=start + 1)  # just after the boundary: the previous window still counts
    assert not late.allowed and late.used == 10 and late.retry_after_s >= 1
    assert limiter.hit(who, 5, now=start + 31).allowed  # half a window later, half of it has slid out
    assert not limiter.hit(who, 1, now=start + 31).allowed


def test_unknown_columns_and_missing_images_are_named_not_guessed(served: Served) -> None:
    rec = next(iter(served.customers.values()))
    assert decode(rec.value)["before"] is None  # the workload only inserted this customer
    with served.client("m0101") as client:
        answer = client.reveal("kyc_review", [_ref(rec, ["nickname", "gender"]), _ref(rec, ["mobile"], "before")])
    unknown, before = answer.results
    assert unknown["decision"] == "partial" and unknown["refused"] == {"nickname": "unclassified"}
    assert set(unknown["fields"]) == {"gender"}
    assert before["decision"] == "not_found" and before["reason"] == "no_such_image"  # a create has no before
    audits = served.audit(answer.request_id, count=2)
    assert sorted(a["decision"] for a in audits) == ["reveal_not_found", "reveal_partial"]


def test_held_and_erased_subjects_are_not_opened(served: Served) -> None:
    """A subject under legal hold: its sealed fields are refused (`restricted`) while its clear fields,
    which need no decryption, are given. A crypto-shredded subject: `erased`. Runs last: it shreds."""
    keys = build_keys(load_settings(None, redis_url=served.env["GUARD_REDIS_URL"]), listen=False)
    cid, rec = list(served.customers.items())[-1]
    subject = decode(rec.value)["subject"]
    keys.store.set_hold("0101", subject, True)
    try:
        with served.client("m0101") as client:
            held = client.reveal("kyc_review", [_ref(rec, ["gender", "mobile"])]).results[0]
            assert held["decision"] == "denied" and held["reason"] == "restricted" and held["fields"] == {}
            clear = client.reveal("kyc_review", [_ref(rec, ["gender"])]).results[0]
            assert clear["decision"] == "allowed" and set(clear["fields"]) == {"gender"}
    finally:
        keys.store.set_hold("0101", subject, False)
    keys.shred("0101", subject, orjson.dumps({"test": "reveal service"}))
    deadline = time.monotonic() + 60
    with served.client("m0101") as client:
        while True:
            answer = client.reveal("kyc_review", [_ref(rec, ["mobile"])])
            if answer.results[0]["reason"] == "erased":
                break
            assert time.monotonic() < deadline, "the service still opens a shredded subject after 60 s"
            time.sleep(1)
    assert answer.status == 403 and answer.results[0]["refused"] == {"mobile": "erased"}
    [audit] = served.audit(answer.request_id)
    assert audit["decision"] == "reveal_denied" and _reason(audit)["why"] == "erased"
