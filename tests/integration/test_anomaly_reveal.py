"""Issue 15: the access rules fire from real reveal calls.

The real reveal service (`guard reveal serve` as a process, as the `reveal` Kafka principal, the real Cedar
policy) reveals and searches records that a real `guard run` worker sanitized from the branch database;
every call writes its audit records to `guard.audit`. The test reads those records back (by request id)
and hands them, as the analyzer's adapter reads them from Kafka (`facts_from_record`), to the analyzer over
the stack's Redis. Planted: a bulk reveal, a bulk search, a first access to the branch, a first access to a
data category, an unknown principal, a disabled principal and a former owner's principal after the
transfer's cut-off; beside them a normal manager's reveals and searches, which must raise nothing.

The principals' registry, the transfer and the principals' earlier history (the first-access baselines,
two days ago) are facts, as `guard alerts publish-entities` and earlier traffic would have given them.
The faust path over Kafka is tested in test_anomaly_stream.py; here the facts are the real service's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from guard.anomaly.engine import Analyzer, Emit
from guard.anomaly.facts import Fact, facts_from_record
from guard.anomaly.rules import RuleConfig, default_rules_path
from guard.anomaly.state import AnomalyState
from guard.errors import DecodeError
from guard.keys.store import RedisKeyStore
from guard.policy.engine import default_directory
from guard.policy.sources import staff_entities
from guard.records.codec import decode
from guard.reveal.client import Ref, RevealClient
from guard.reveal.tokens import TokenStore, load_token_key
from guard.workload.branch import run_workload
from tests.integration.kafka_helpers import GuardProcess, admin_redis_env, high_watermark, kafka_conf, wait_for
from tests.integration.test_reveal_service import _free_port, _reveal_kafka_env, _start, _stop, _store

pytestmark = pytest.mark.integration

CUSTOMERS = "sanitized.br0101.public.customers"
RUN = uuid.uuid4().hex[:6]
#: who → organisation; all managers of branch 0101 in the policy (so the policy lets each reveal)
PEOPLE = {"m1": "bank-a", "m2": "bank-a", "m3": "bank-a", "s1": "bank-a", "n1": "bank-a", "g1": "bank-a",
          "d1": "bank-a", "o1": "bank-old"}
DAY_MS = 86_400_000
SH = ZoneInfo("Asia/Shanghai")
ROLES = {"audit": "guard.audit", "dlq": "guard.dlq", "anomalies": "guard.anomalies",
         "deletions": "guard.deletions", "facts": "guard.facts"}


def cedar(who: str) -> str:
    return f"Staff::{who}-{RUN}"


def named(who: str) -> str:
    """The analyzer's name of the principal (`Staff:<id>`)."""
    return f"Staff:{who}-{RUN}"


@dataclass
class Calls:
    """What the service wrote: the audit records of the calls (position, value) and when the calls began."""

    records: list[tuple[int, int, int, bytes]]
    started_ms: int


@pytest.fixture(scope="module")
def calls(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Calls]:
    tmp = tmp_path_factory.mktemp("anomaly-reveal")
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    policy = tmp / "policy"
    shutil.copytree(default_directory(), policy)
    entities = json.loads((policy / "entities.json").read_text())
    staff = staff_entities([(f"{who}-{RUN}", "0101", org, True, ["manager"]) for who, org in PEOPLE.items()])
    (policy / "entities.json").write_text(json.dumps(entities + staff))
    # three customers through Debezium and a real worker: the records the calls reveal
    group = f"anrev-{uuid.uuid4().hex[:8]}"
    worker = GuardProcess(stack, worker_id=f"{group}-w1", group_id=group, log_dir=tmp).start(from_end=True)
    result = run_workload(stack["GUARD_BRANCH_DSN"], customers=3, update=0, delete=0, seed=9_000 + os.getpid())
    ids = set(result.customers)
    try:
        recs = wait_for(bootstrap, CUSTOMERS, lambda rs: ids <= {orjson.loads(r.key)["customer_id"] for r in rs
                                                                 if r.key and r.value}, timeout=180)
    finally:
        worker.stop()
    customers = [r for r in recs if r.key and r.value and orjson.loads(r.key)["customer_id"] in ids][-3:]
    # where the audit topic is now (after the worker: on a new stack the worker is what creates it); the
    # calls' records come after this
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": "unused"})
    try:
        meta = consumer.list_topics("guard.audit", timeout=10).topics["guard.audit"]
        assert meta.error is None and meta.partitions, "guard.audit does not exist"
        audit_start = [TopicPartition("guard.audit", p, high_watermark(consumer, "guard.audit", p))
                       for p in meta.partitions]
    finally:
        consumer.close()
    token_key_file = tmp / "reveal-token.key"
    env = {**os.environ, **stack, **_reveal_kafka_env(), "GUARD_REVEAL_TOKEN_KEY_FILE": str(token_key_file),
           "GUARD_POLICY_STAFF": "file"}
    port = _free_port()
    proc, url = _start(env, port, policy, tmp / "reveal.log")
    store = TokenStore(_store(stack), load_token_key(token_key_file))
    tokens = {who: store.create(cedar(who))[0] for who in PEOPLE}

    def reveal(who: str, fields: list[str], n: int) -> None:
        refs = [Ref(customers[i % 3].topic, customers[i % 3].partition, customers[i % 3].offset, fields)
                for i in range(n)]
        with RevealClient(url, tokens[who]) as client:
            answer = client.reveal("kyc_review", refs)
        assert answer.status == 200, (who, answer.status, [r["refused"] for r in answer.results])

    def search(who: str, n: int) -> None:
        with RevealClient(url, tokens[who]) as client:
            client.search("kyc_review", "public.customers", "mobile", [f"1390000{i:04d}" for i in range(n)])

    started = int(time.time() * 1000)
    try:
        reveal("m1", ["name", "mobile"], 3)   # normal: a few customers' name and mobile
        search("m1", 2)                       # normal: two numbers looked up
        reveal("m2", ["name"], 18)            # bulk: 36 identity records (the test's limit is 30)
        reveal("m2", ["name"], 18)
        search("s1", 40)                      # bulk search: 40 contact values (limit 30)
        reveal("m3", ["name"], 1)             # first use of identity data (its history: contact only)
        reveal("n1", ["gender"], 1)           # first access to the branch (gender: a category not watched)
        reveal("g1", ["mobile"], 1)           # not in the principal registry
        reveal("d1", ["mobile"], 1)           # disabled in the registry
        reveal("o1", ["mobile"], 1)           # the former owner's staff, after the transfer's cut-off
    finally:
        _stop(proc, tmp / "reveal.log")
    # the calls' audit records (reveal and search; a search's records name no record position)
    expected = 3 + 1 + 36 + 1 + 1 + 1 + 1 + 1 + 1
    prefixes = {cedar(who) for who in PEOPLE}
    found: list[tuple[int, int, int, bytes]] = []
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": "unused", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    try:
        consumer.assign(audit_start)
        deadline = time.monotonic() + 120
        while len(found) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() or msg.value() is None:
                continue
            try:
                doc = decode(msg.value())
                ours = doc.get("op") in ("reveal", "search") and \
                    orjson.loads(doc.get("reason") or "{}").get("principal") in prefixes
            except (DecodeError, orjson.JSONDecodeError, AttributeError):
                continue  # another writer's record (the topic is shared)
            if ours:
                found.append((msg.partition() or 0, msg.offset() or 0, msg.timestamp()[1], msg.value()))
    finally:
        consumer.close()
    assert len(found) == expected, f"{len(found)} audit records of the calls, {expected} expected"
    yield Calls(found, started)


def _analyze(stack: dict[str, str], calls: Calls, rules_toml: str) -> tuple[Analyzer, list[Emit], list[Fact]]:
    """The calls' audit records through the analyzer's adapter and rules, over a fresh tenant in Redis."""
    redis = admin_redis_env(stack)
    store = RedisKeyStore(redis["GUARD_REDIS_URL"], "demo-bank", password_file=redis["GUARD_REDIS_PASSWORD_FILE"])
    rules = RuleConfig(tomllib.loads(default_rules_path().read_text() + rules_toml))
    analyzer = Analyzer(AnomalyState(store.client, f"ar{uuid.uuid4().hex[:10]}"), rules)
    now = calls.started_ms

    def fact(kind: str, ts: int, who: str | None = None, **kw: Any) -> Fact:
        return Fact(kind, f"history:{uuid.uuid4().hex}", ts, "0101", principal=named(who) if who else None, **kw)

    # history first (no registry yet): what each principal read two days ago, the first-access baselines
    history = {"m1": ["identity", "contact"], "m2": ["identity"], "m3": ["contact"], "s1": ["contact"],
               "g1": ["contact"], "d1": ["contact"], "o1": ["contact"]}
    for who, cats in history.items():
        analyzer.process(fact("access", now - 2 * DAY_MS, who, action="reveal", categories={c: 1 for c in cats}))
    # the registry (everyone but g1), d1 disabled since yesterday, the branch transferred an hour ago
    for who, org in PEOPLE.items():
        if who != "g1":
            analyzer.process(fact("principal", now - 3 * DAY_MS, who, attrs={"state": "active", "owner": org}))
    analyzer.process(fact("principal", now - DAY_MS, "d1", attrs={"state": "disabled", "owner": "bank-a"}))
    analyzer.process(fact("transfer", now - DAY_MS,
                          attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": now - 3_600_000}))
    emits: list[Emit] = []
    real: list[Fact] = []
    for partition, offset, ts, value in calls.records:
        facts = facts_from_record("guard.audit", partition, offset, ts, value, topics=ROLES)
        real += facts
        for e in analyzer.process_batch(facts):
            analyzer.emitted(e)
            emits.append(e)
    return analyzer, emits, real


#: The test branch's limits and learning period: one day of learning from the first access fact.
LIMITS = '\n[branches."0101".bulk_access]\nthresholds = { identity = 30, contact = 30 }\n' \
         '[branches."0101".first_access]\nlearn_s = 86400\n'
ALWAYS_OPEN = '[branches."0101".business_hours]\nweekdays = [1, 2, 3, 4, 5, 6, 7]\nstart = "00:00"\nend = "24:00"\n'
NEVER_OPEN = '[branches."0101".business_hours]\nweekdays = [1, 2, 3, 4, 5, 6, 7]\nstart = "00:00"\nend = "00:00"\n'


def _alerts(emits: list[Emit]) -> dict[tuple[str, str | None], set[str]]:
    out: dict[tuple[str, str | None], set[str]] = {}
    for e in emits:
        out.setdefault((e.record["rule"], e.record["principal"]), set()).add(e.id)
    return out


def test_each_planted_access_abuse_raises_one_alert_of_its_rule(stack: dict[str, str], calls: Calls) -> None:
    _, emits, facts = _analyze(stack, calls, LIMITS + ALWAYS_OPEN)
    assert Counter(f.kind for f in facts) == Counter({"access": len(calls.records)}), "every call gave something"
    alerts = _alerts(emits)
    want = {("bulk_access", named("m2")), ("bulk_access", named("s1")), ("first_access_category", named("m3")),
            ("first_access_branch", named("n1")), ("unknown_principal", named("g1")),
            ("disabled_principal", named("d1")), ("access_after_transfer_cutoff", named("o1"))}
    assert set(alerts) == want, f"unexpected or missing: {set(alerts) ^ want}"
    assert all(len(ids) == 1 for ids in alerts.values()), "one alert per planted abuse"
    assert not [k for k in alerts if k[1] == named("m1")], "the normal manager raised an alert"


def test_the_bulk_counts_are_the_records_and_values_given(stack: dict[str, str], calls: Calls) -> None:
    analyzer, emits, _ = _analyze(stack, calls, LIMITS + ALWAYS_OPEN)
    bulk = {e.record["principal"]: e.id for e in emits if e.record["rule"] == "bulk_access"}
    counts = {who: (analyzer.state.alert_state(bulk[named(who)]) or {}).get("count") for who in ("m2", "s1")}
    assert counts == {"m2": 36, "s1": 40}, "36 names revealed, 40 mobiles searched"
    [critical] = [e for e in emits if e.record["rule"] == "access_after_transfer_cutoff"]
    assert critical.severity == "critical"
    refs = {ev["ref"] for e in emits for ev in e.record["evidence"] if ev["kind"] == "record"}
    assert refs and all(r.startswith("guard.audit:") for r in refs), "evidence: the audit records' positions"


def test_reveals_outside_the_branch_hours_raise_one_alert_per_principal(stack: dict[str, str],
                                                                        calls: Calls) -> None:
    """The same calls, with the branch's hours around them (nothing) and with hours that exclude them."""
    _, emits, _ = _analyze(stack, calls, LIMITS + ALWAYS_OPEN)
    assert not [e for e in emits if e.record["rule"] == "outside_business_hours"]
    _, emits, facts = _analyze(stack, calls, LIMITS + NEVER_OPEN)
    alerts = _alerts(emits)
    # one alert per principal and local day of the branch (the calls take seconds; they may straddle midnight)
    days = {who: {datetime.fromtimestamp(f.ts_ms / 1000, UTC).astimezone(SH).date() for f in facts
                  if f.principal == named(who)} for who in PEOPLE}
    hours = {who: len(alerts.get(("outside_business_hours", named(who)), set())) for who in PEOPLE}
    assert hours == {who: len(d) for who, d in days.items()} and all(hours.values())
