"""Kafka's principals on the real stack (issue 20): who gets in, who reads what, and `guard doctor` noticing a
weakness. Clients here connect as the principal under test; everything else (setup, ACL changes) as admin."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from guard.kafka_security import sasl_ssl_config
from guard.stack.config import StackConfig
from guard.stack.kafka_auth import client_config
from tests.integration.kafka_helpers import REPO, GuardProcess, kafka_conf, produce_raw, wait_for

pytestmark = pytest.mark.integration

RAW = "br0101.public.customers"


@pytest.fixture(scope="module")
def cfg(stack: dict[str, str]) -> StackConfig:
    return StackConfig.from_env()


def _as(cfg: StackConfig, user: str, **extra: Any) -> dict[str, Any]:
    return {**client_config(cfg, user), **extra}


def _fetch_error(conf: dict[str, Any], topic: str, group: str, timeout: float = 20.0) -> KafkaError | None:
    """Read `topic` from its start: None when a record arrives, else the error the broker answered."""
    consumer = Consumer({**conf, "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        # a subscription (not an assignment): librdkafka reports a subscribed topic the broker refuses to
        # describe as TOPIC_AUTHORIZATION_FAILED, while an assigned one it can't see just stays silent
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                return msg.error()
            return None
        raise AssertionError(f"neither a record nor an error from {topic} within {timeout:.0f}s")
    finally:
        consumer.close()


def _produce_error(conf: dict[str, Any], topic: str) -> KafkaError | None:
    errors: list[KafkaError | None] = []
    producer = Producer({**conf, "message.timeout.ms": 15000})
    producer.produce(topic, b"not allowed", callback=lambda err, _msg: errors.append(err))
    producer.flush(20)
    assert errors, "no delivery report"
    return errors[0]


def test_anonymous_clients_are_refused(stack: dict[str, str], cfg: StackConfig) -> None:
    for conf in ({"security.protocol": "PLAINTEXT"},
                 {"security.protocol": "SSL", "ssl.ca.location": str(cfg.tls_dir / "ca.crt")}):
        admin = AdminClient({"bootstrap.servers": stack["GUARD_KAFKA_BOOTSTRAP"], **conf})
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)


def test_a_wrong_password_is_refused(stack: dict[str, str], cfg: StackConfig) -> None:
    conf = {"bootstrap.servers": stack["GUARD_KAFKA_BOOTSTRAP"],
            **sasl_ssl_config("guard", "not-the-password", cfg.tls_dir / "ca.crt")}
    with pytest.raises(KafkaException):
        AdminClient(conf).list_topics(timeout=8)
    # the right one gets in (so the refusal above is about the password)
    assert AdminClient(_as(cfg, "guard")).list_topics(timeout=10).brokers


def test_downstream_oncall_and_reveal_cannot_read_raw_topics(stack: dict[str, str], cfg: StackConfig) -> None:
    for user in ("downstream", "oncall", "reveal"):
        # a group each may use (the reveal service's is one fixed name), so the refusal is the topic's
        group = "branchguard-reveal" if user == "reveal" else f"{user}-t-{uuid.uuid4().hex[:6]}"
        err = _fetch_error(_as(cfg, user), RAW, group)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (user, err)
        # nor are raw topics even listed to them, but to on-call: its status page shows the sanitizers' lag,
        # which needs DESCRIBE on their topics (the names and end offsets, never a record)
        topics = AdminClient(_as(cfg, user)).list_topics(timeout=10).topics
        listed = [t for t in topics if t.startswith("br0101.")]
        assert bool(listed) == (user == "oncall"), user
    assert _fetch_error(_as(cfg, "guard"), RAW, f"branchguard-sanitizer-t-{uuid.uuid4().hex[:6]}") is None


def test_guard_principal_sanitizes_downstream_reads_and_oncall_reads_alerts_only(
        stack: dict[str, str], cfg: StackConfig, tmp_path) -> None:
    """A worker running as `guard` (not admin) does its whole job; `downstream` reads its output; `oncall`
    reads the audit topic and may not write alerts."""
    group = f"branchguard-sanitizer-sec-{uuid.uuid4().hex[:6]}"
    worker = GuardProcess(stack, worker_id=f"{group}-w1", group_id=group, log_dir=tmp_path,
                          extra_env=cfg.kafka_env("guard")).start(from_end=True)
    try:
        table = f"sec_{uuid.uuid4().hex[:8]}"
        event = {"before": None, "after": {"id": 7, "note": "hello"}, "op": "c", "ts_ms": 1,
                 "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": table}}
        produce_raw(stack["GUARD_KAFKA_BOOTSTRAP"], f"br0101.public.{table}", json.dumps(event).encode(), b'{"id": 7}')
        sanitized = f"sanitized.br0101.public.{table}"
        wait_for(stack["GUARD_KAFKA_BOOTSTRAP"], sanitized, lambda rs: len(rs) >= 1, timeout=90)
        assert worker.alive(), worker.log()[-3000:]
        assert "AUTHORIZATION" not in worker.log().upper(), worker.log()[-3000:]
    finally:
        worker.stop()
    assert _fetch_error(_as(cfg, "downstream"), sanitized, f"downstream-t-{uuid.uuid4().hex[:6]}") is None
    assert _fetch_error(_as(cfg, "oncall"), "guard.audit", f"oncall-t-{uuid.uuid4().hex[:6]}") is None
    err = _fetch_error(_as(cfg, "oncall"), sanitized, f"oncall-t-{uuid.uuid4().hex[:6]}")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    err = _produce_error(_as(cfg, "oncall"), "guard.anomalies")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    err = _produce_error(_as(cfg, "downstream"), sanitized)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    # the reveal service's principal reads sanitized records and writes audit decisions (what
    # test_reveal_service.py's service, run as `reveal`, does), nothing else
    assert _fetch_error(_as(cfg, "reveal"), sanitized, "branchguard-reveal") is None
    for topic in (sanitized, "guard.anomalies", "guard.deletions"):
        err = _produce_error(_as(cfg, "reveal"), topic)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, err)
    err = _fetch_error(_as(cfg, "reveal"), "guard.audit", "branchguard-reveal")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_analyzer_principal_reads_evidence_writes_alerts_and_nothing_else(stack: dict[str, str],
                                                                          cfg: StackConfig) -> None:
    """`analyzer` (the anomaly analyzer, least privilege): reads the evidence and writes alerts and facts;
    no raw topic, no other sanitized topic, no other topic to write."""
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    for topic in ("guard.audit", "guard.anomalies", "guard.facts"):
        admin.create_topics([NewTopic(topic, 1, 1)])
    p = Producer(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    p.produce("guard.audit", b"{}")
    assert p.flush(30) == 0
    group = f"branchguard-analyzer-t-{uuid.uuid4().hex[:6]}"
    assert _fetch_error(_as(cfg, "analyzer"), "guard.audit", group, timeout=60) is None
    assert _produce_error(_as(cfg, "analyzer"), "guard.anomalies") is None
    assert _produce_error(_as(cfg, "analyzer"), "guard.facts") is None
    err = _fetch_error(_as(cfg, "analyzer"), RAW, group)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    for topic in ("guard.audit", "sanitized.br0101.public.customers"):
        err = _produce_error(_as(cfg, "analyzer"), topic)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, err)


# --- guard doctor ---------------------------------------------------------------------------------------------
def _doctor(stack: dict[str, str], cfg: StackConfig) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack, **cfg.kafka_env("guard")}  # the guard's own principal, as deployed
    return subprocess.run([sys.executable, "-m", "guard.cli", "doctor", "--settle", "5"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_doctor_passes_on_the_stack(stack: dict[str, str], cfg: StackConfig) -> None:
    out = _doctor(stack, cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("encrypted and authenticated", "anonymous clients refused", "raw topics readable by the guard only",
                 "no plaintext listener"):
        assert f"ok    kafka: {name}" in out.stdout, out.stdout


def test_doctor_names_a_principal_given_read_on_the_raw_topics(stack: dict[str, str], cfg: StackConfig) -> None:
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    widened = AclBinding(ResourceType.TOPIC, "br0101.", ResourcePatternType.PREFIXED, "User:downstream", "*",
                         AclOperation.READ, AclPermissionType.ALLOW)
    admin.create_acls([widened])[widened].result()
    try:
        out = _doctor(stack, cfg)
    finally:
        flt = AclBindingFilter(ResourceType.TOPIC, "br0101.", ResourcePatternType.PREFIXED, "User:downstream", "*",
                               AclOperation.READ, AclPermissionType.ALLOW)
        admin.delete_acls([flt])[flt].result()
    assert out.returncode == 1, out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "raw topics readable by the guard only" in ln)
    assert line.startswith("FAIL") and "User:downstream" in line, out.stdout
    assert _doctor(stack, cfg).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_doctor_finds_a_plaintext_listener_added_at_runtime(stack: dict[str, str], cfg: StackConfig) -> None:
    """A PLAINTEXT listener added to the running broker as a dynamic per-broker config (no restart)."""
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    broker = ConfigResource(ConfigResource.Type.BROKER, str(cfg.broker_node_id))
    current = admin.describe_configs([broker])[broker].result()
    listeners = current["listeners"].value
    protocols = current["listener.security.protocol.map"].value
    port = _free_port()

    def alter(entries: list[ConfigEntry]) -> None:
        resource = ConfigResource(ConfigResource.Type.BROKER, str(cfg.broker_node_id), incremental_configs=entries)
        admin.incremental_alter_configs([resource])[resource].result()

    alter([ConfigEntry("listener.security.protocol.map", f"{protocols},OPEN:PLAINTEXT",
                       incremental_operation=AlterConfigOpType.SET),
           ConfigEntry("listeners", f"{listeners},OPEN://{cfg.host}:{port}",
                       incremental_operation=AlterConfigOpType.SET)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((cfg.host, port)) == 0:
                    break
            time.sleep(0.5)
        out = _doctor(stack, cfg)
    finally:
        alter([ConfigEntry("listeners", "", incremental_operation=AlterConfigOpType.DELETE)])
        # the broker applies the listeners' removal from the metadata log a moment later; until then it refuses
        # a protocol map without OPEN (INVALID_REQUEST "No security protocol defined for listener OPEN")
        deadline = time.monotonic() + 60
        while True:
            try:
                alter([ConfigEntry("listener.security.protocol.map", "",
                                   incremental_operation=AlterConfigOpType.DELETE)])
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    assert out.returncode == 1, out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "no plaintext listener" in ln)
    assert line.startswith("FAIL") and f":{port}" in line, out.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the listener is gone again
        with socket.socket() as s:
            if s.connect_ex((cfg.host, port)) != 0:
                break
        time.sleep(0.5)
    assert _doctor(stack, cfg).returncode == 0
