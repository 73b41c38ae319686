"""On-call tools over the real stack: the status page in headless Chromium shows a planted critical alert
(screenshot in the test's tmp path), and `guard alerts tail` filters and prints alerts from Kafka."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from guard.anomaly.engine import Analyzer, Emit
from guard.anomaly.facts import Fact
from guard.anomaly.rules import RuleConfig
from guard.anomaly.runtime import status_source
from guard.anomaly.state import AnomalyState
from guard.anomaly.status import StatusServer
from guard.config import load_settings
from guard.kafka_security import client_config
from guard.keys.store import RedisKeyStore
from tests.integration.kafka_helpers import REPO, admin_redis_env, kafka_conf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack: dict[str, str]) -> dict[str, str]:
    """The stack with Redis as its admin: these tests give each test a tenant of its own."""
    return {**stack, **admin_redis_env(stack)}

T0 = 1_796_000_000_000  # Monday 2026-11-30, 08:53 in Shanghai (before the branch opens)


def _plant(stack: dict[str, str], tenant: str) -> list[Emit]:
    """A transfer, a former owner's teller after its cut-off (critical) and a bulk export (high)."""
    store = RedisKeyStore(stack["GUARD_REDIS_URL"], "demo-bank",
                          password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    a = Analyzer(AnomalyState(store.client, tenant), RuleConfig.load())
    a.process(Fact("principal", "p1", T0 - 10, "0101", principal="old-teller", attrs={"owner": "bank-old"}))
    a.process(Fact("principal", "p2", T0 - 10, "0101", principal="teller-1", attrs={"owner": "bank-a"}))
    a.process(Fact("transfer", "t1", T0 - 5, "0101", attrs={"from_owner": "bank-old", "to_owner": "bank-a",
                                                             "cutoff_ms": T0, "state": "cut over"}))
    emits = a.process(Fact("access", "f1", T0 + 1000, "0101", principal="old-teller", action="reveal",
                           categories={"contact": 1}))
    emits += a.process(Fact("access", "f2", T0 + 2000, "0101", principal="teller-1", action="export", count=40,
                            categories={"account": 40}))
    return emits


def test_status_page_shows_a_planted_critical_alert(stack: dict[str, str], tmp_path: Path) -> None:
    tenant = f"st{uuid.uuid4().hex[:8]}"
    emits = _plant(stack, tenant)
    critical = [e for e in emits if e.severity == "critical"]
    assert critical
    settings = dataclasses.replace(load_settings(), kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"],
                                   redis_url=stack["GUARD_REDIS_URL"], tenant=tenant,
                                   redis_password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    server = StatusServer(status_source(settings).snapshot).start()
    url = f"http://127.0.0.1:{server.port}/"
    shot = tmp_path / "status-page.png"
    chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]
    try:
        dom = subprocess.run([*chrome, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
        subprocess.run([*chrome, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
        snapshot = httpx.get(url + "api/status", timeout=60).json()
    finally:
        server.stop()
    print(f"status page screenshot: {shot}")
    assert shot.exists() and shot.stat().st_size > 10_000
    page = dom.stdout
    assert "access_after_transfer_cutoff" in page and critical[0].id[:12] in page
    assert 'class="pill critical">critical: 1<' in page
    assert "bulk_access" in page and "bank-old" in page and "cut over" in page
    assert "sanitizer" in page and "analyzer" in page  # the pipeline rows
    assert snapshot["open_by_severity"]["critical"] == 1 and snapshot["open_by_severity"]["high"] == 1
    assert [p["stage"] for p in snapshot["pipeline"]] == ["sanitizer", "analyzer"]


def test_alerts_tail_filters_and_prints(stack: dict[str, str], tmp_path: Path) -> None:
    tenant = f"tl{uuid.uuid4().hex[:8]}"
    topic = f"{tenant}.anomalies"
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    try:
        emits = _plant(stack, tenant)
        p = Producer(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
        for e in emits:
            p.produce(topic, e.value, key=e.id.encode())
        # one of the sanitizer's JSON anomalies on the same topic
        p.produce(topic, json.dumps({"type": "anomaly", "rule": "schema_drift_unclassified_column", "severity": "high",
                                     "branch": "0101", "table": "public.notes", "column": "x", "at_ms": T0,
                                     "suggested_action": "classify it"}).encode())
        assert p.flush(10) == 0
        env = {**os.environ, **stack, "PYTHONPATH": str(REPO), "GUARD_ANOMALIES_TOPIC": topic}
        base = [sys.executable, "-m", "guard.cli", "alerts", "tail", "--no-follow", "--from-beginning"]
        out = subprocess.run([*base, "--severity", "critical", "--json"], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["rule"] for d in docs] == ["access_after_transfer_cutoff"] and docs[0]["state"] == "open"
        out = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        assert "CRITICAL" in out and "principal=old-teller" in out and "HIGH" in out and "→ " in out
        assert "schema_drift_unclassified_column" in out
        out = subprocess.run([*base, "--rule", "bulk_access"], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert "bulk_access" in out and "CRITICAL" not in out
    finally:
        admin.delete_topics([topic])


def test_publish_entities_feeds_the_registry(stack: dict[str, str], tmp_path: Path) -> None:
    """`guard alerts publish-entities` writes the policy's staff and branches as principal/transfer facts."""
    name = f"pe{uuid.uuid4().hex[:8]}"
    topic = f"{name}.facts"
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    entities = tmp_path / "entities.json"
    entities.write_text(json.dumps([
        {"uid": {"type": "BranchGuard::Branch", "id": "0101"}, "attrs": {
            "code": "0101", "owner": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-b"}},
            "transfer_state": "transferring", "cutoff": {"__extn": {"fn": "datetime", "arg": "2027-03-31T16:00:00Z"}}}},
        {"uid": {"type": "BranchGuard::Staff", "id": "t0101-01"}, "attrs": {
            "branch": {"__entity": {"type": "BranchGuard::Branch", "id": "0101"}},
            "organisation": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-a"}}, "active": False}},
    ]))
    try:
        env = {**os.environ, **stack, "PYTHONPATH": str(REPO), "GUARD_FACTS_TOPIC": topic}
        out = subprocess.run([sys.executable, "-m", "guard.cli", "alerts", "publish-entities", str(entities)],
                             env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        assert "1 principals and 1 transfers" in out
        from tests.integration.kafka_helpers import read_all

        docs = {d["kind"]: d for d in (json.loads(r.value) for r in read_all(stack["GUARD_KAFKA_BOOTSTRAP"], topic)
                                       if r.value)}
        assert docs["principal"]["principal"] == "Staff:t0101-01"
        assert docs["principal"]["attrs"] == {"state": "disabled", "owner": "bank-a"}
        assert docs["transfer"]["attrs"]["to_owner"] == "bank-b"
    finally:
        admin.delete_topics([topic])


def test_oncall_reads_the_guard_groups_lag_and_no_raw_record(stack: dict[str, str]) -> None:
    """The status page run as `oncall` sees the sanitizer's topics and its group's committed offsets (DESCRIBE
    on the group and the topics, guard/stack/kafka_auth.py); it can't read a raw record nor another group."""
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

    from guard.stack.config import StackConfig

    cfg = StackConfig.from_env()
    settings = dataclasses.replace(load_settings(), kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"],
                                   kafka_username="oncall", kafka_password_file=str(cfg.kafka_password_file("oncall")),
                                   redis_url=stack["GUARD_REDIS_URL"], tenant=f"lg{uuid.uuid4().hex[:8]}",
                                   redis_password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    rows = {r["stage"]: r for r in status_source(settings).pipeline()}
    assert rows["sanitizer"]["partitions"] > 0, "on-call must see the raw topics whose lag it shows"
    conf = client_config(settings)
    admin = AdminClient(conf)
    raw = "br0101.public.customers"
    parts = [TopicPartition(raw, 0)]
    [fut] = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(settings.group_id, parts)]).values()
    result = fut.result(timeout=30)  # allowed: no authorization error
    assert [tp.topic for tp in result.topic_partitions] == [raw]
    assert all(tp.error is None for tp in result.topic_partitions)
    [other] = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions("downstream-x", parts)]).values()
    with pytest.raises(KafkaException) as refused:
        other.result(timeout=30)
    assert refused.value.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED
    consumer = Consumer({**conf, "group.id": f"oncall-test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(raw, 0, 0)])
        codes = []
        deadline = time.monotonic() + 60
        while not codes and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is not None, "on-call read a raw record"
                codes.append(msg.error().code())
        assert codes == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    finally:
        consumer.close()
