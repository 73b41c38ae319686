"""Test helpers over real Kafka: read committed records, start and stop guard workers as processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from tests.leak_scanner import LeakScanner  # noqa: F401 - the integration tests import it from here

REPO = Path(__file__).resolve().parents[2]
GUARD = [sys.executable, "-m", "guard.cli"]


def kafka_conf(bootstrap: str) -> dict[str, Any]:
    """`bootstrap` and the admin principal's TLS + SASL settings: tests use the admin unless they test a
    principal (tests/integration/test_security_kafka.py does)."""
    from guard.stack.config import StackConfig
    from guard.stack.kafka_auth import client_config

    return {**client_config(StackConfig.from_env(), "admin"), "bootstrap.servers": bootstrap}


def admin_kafka_settings() -> dict[str, Any]:
    """The Kafka security fields of `guard.config.Settings` for the admin principal (tests that build
    Settings directly; `load_settings` gets the same from the environment the `stack` fixture sets)."""
    from guard.stack.config import StackConfig

    cfg = StackConfig.from_env()
    return {"kafka_security_protocol": "SASL_SSL", "kafka_username": "admin",
            "kafka_password_file": str(cfg.kafka_password_file("admin")), "kafka_ca_file": str(cfg.tls_dir / "ca.crt")}


def admin_redis_env(stack: dict[str, str]) -> dict[str, str]:
    """`GUARD_REDIS_URL` and `GUARD_REDIS_PASSWORD_FILE` of the stack's Redis admin user: for tests that use
    tenants of their own (isolated counters), which the guard's Redis user may not touch (its ACL allows
    the keys of the stack's tenants only, guard/stack/redisd.py)."""
    from guard.stack.config import StackConfig
    from guard.stack.secrets import REDIS_ADMIN_USER, REDIS_GUARD_USER

    cfg = StackConfig.from_env()
    url = stack["GUARD_REDIS_URL"].replace(f"://{REDIS_GUARD_USER}@", f"://{REDIS_ADMIN_USER}@", 1)
    return {"GUARD_REDIS_URL": url, "GUARD_REDIS_PASSWORD_FILE": str(cfg.secrets_dir / "redis-admin.password")}


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    timestamp: int = 0


def read_all(bootstrap: str, topic: str, *, timeout: float = 5.0) -> list[Rec]:
    """Every committed record currently in `topic` (read_committed), from the beginning.

    `timeout` is how long the read may go WITHOUT PROGRESS (no record, no position moving) before it gives
    up and returns what it has: a partition held at an open transaction's last stable offset stops there.
    A fixed deadline instead cut long reads short on a loaded machine (a reliability test's 14,000 audit
    records over TLS took longer than 5 s, and its tail looked LOST)."""
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": f"test-{uuid.uuid4()}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return []
        ends = {p: high_watermark(consumer, topic, p) for p in meta.partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Rec] = []
        deadline = time.monotonic() + timeout
        done: set[int] = {p for p, h in ends.items() if h == 0}
        positions: dict[int, int] = {}
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                out.append(Rec(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                               msg.headers(), msg.timestamp()[1]))
                deadline = time.monotonic() + timeout
            for p, high in ends.items():
                pos = consumer.position([TopicPartition(topic, p)])[0].offset
                if pos > positions.get(p, -1):
                    positions[p] = pos
                    deadline = time.monotonic() + timeout
                if pos >= high:
                    done.add(p)
        return out
    finally:
        consumer.close()


def high_watermark(consumer: Consumer, topic: str, partition: int, timeout: float = 60.0) -> int:
    """High watermark, retrying transient errors: a topic created a moment ago, or a broker just restarted
    after a crash (partitions in leader recovery), may have no leader yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_for(bootstrap: str, topic: str, predicate: Callable[[list[Rec]], bool], *, timeout: float = 90.0) -> list[Rec]:
    """Poll `topic` until `predicate(records)` holds; fail with what was seen if it never does."""
    deadline = time.monotonic() + timeout
    records: list[Rec] = []
    while time.monotonic() < deadline:
        records = read_all(bootstrap, topic)
        if predicate(records):
            return records
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting on {topic}; {len(records)} records seen")


def sanitizer_anomalies(records: list[Rec]) -> list[dict[str, Any]]:
    """The sanitizer's anomalies among `records` of `guard.anomalies`, decoded.

    The topic has more than one writer: the sanitizer writes JSON objects, the analyzer Avro alerts
    (docs/anomalies.md), and other tests write probes with the analyzer's grant. A test looking for the
    sanitizer's anomalies decodes the JSON objects and passes over the rest, as `guard alerts tail` does.
    """
    out = []
    for r in records:
        if r.value and r.value[:1] == b"{":
            try:
                out.append(dict(orjson.loads(r.value)))
            except orjson.JSONDecodeError:
                continue
    return out


def produce_raw(bootstrap: str, topic: str, value: bytes | None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = Producer(kafka_conf(bootstrap))
    producer.produce(topic, value, key, headers=headers)
    assert producer.flush(10) == 0


def commit_group_at_end(bootstrap: str, group: str, pattern: str = r"^br0101\.[^.]+\.[^.]+$") -> None:
    """Start `group` at the current end of every existing raw topic (topics created later: from the start).

    Tests share one stack whose raw topics keep history from earlier tests; a fresh group would first
    work through all of it. This is also how an operator starts a new group on a long-lived cluster.
    """
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": group, "enable.auto.commit": False})
    try:
        offsets = []
        for topic, meta in consumer.list_topics(timeout=10).topics.items():
            if not re.match(pattern, topic) or meta.error is not None:
                continue
            for p in meta.partitions:
                offsets.append(TopicPartition(topic, p, high_watermark(consumer, topic, p)))
        if offsets:
            consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


class GuardProcess:
    """A `guard run` worker as a real OS process (so tests can SIGKILL it)."""

    def __init__(self, env: dict[str, str], *, worker_id: str, group_id: str, log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.worker_id = worker_id
        self.env = {**os.environ, **env, "GUARD_GROUP_ID": group_id, **(extra_env or {})}
        self.log_path = log_dir / f"guard-{worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, from_end: bool = False) -> GuardProcess:
        """Start the worker; `from_end` first commits the group at the end of the existing raw topics."""
        if from_end:
            prefix = re.escape(self.env.get("GUARD_RAW_TOPIC_PREFIX") or "br0101")
            commit_group_at_end(self.env["GUARD_KAFKA_BOOTSTRAP"], self.env["GUARD_GROUP_ID"],
                                rf"^{prefix}\.[^.]+\.[^.]+$")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*GUARD, "run", "--worker-id", self.worker_id], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM; SIGKILL if the worker is still running `timeout` seconds later. True if it exited by itself
        (or had already exited)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Said, because a killed worker may leave a transaction open, and read_committed readers of
                # its output wait for the transaction timeout: a later test's wait would fail for this.
                print(f"worker {self.worker_id} did not stop within {timeout:.0f} s of SIGTERM: killed; its log "
                      "ends:\n" + self.log()[-2000:])
                self.kill()
                return False
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- leak scans ---------------------------------------------------------------------------------------
