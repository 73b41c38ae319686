"""Kafka client configuration and output topics: what the worker's consumer and transactional producer
are set to, and `TopicManager`, which creates output topics on first use (sanitized topics with their raw
topic's partition count). The bench's plain loop uses the same configuration."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from guard.config import Settings
from guard.errors import ConfigError
from guard.kafka_security import client_config

OUTPUT_TOPIC_PARTITIONS = 3
#: `Settings.prefetch_kb`'s range: 1 MiB at least (a fetch response per partition fits), librdkafka's maximum at most.
PREFETCH_KB_MIN, PREFETCH_KB_MAX = 1024, 2_097_151


def consumer_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """A sanitizer worker's consumer settings (the bench's plain loop uses them too, for a fair baseline)."""
    return {
        **client_config(settings),
        "group.id": settings.group_id,
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 15000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 120000,
        "fetch.wait.max.ms": 50,
        # What the consumer holds ahead of the worker is bounded (`Settings.prefetch_kb`): at librdkafka's
        # default (64 MiB) a worker behind its input grew by ~100 MiB (docs/benchmark.md, round 25).
        "queued.max.messages.kbytes": prefetch_kb(settings),
        # Past that bound librdkafka postpones a partition's next fetch by this long. Its default, 1 s,
        # starved any loop that empties its queue faster than that: the bench's plain loop ran at ~120,000
        # events/s at the default bound and 170,000-196,000 with 10 ms (26,815 at 16 MiB; rounds 24-25).
        "fetch.queue.backoff.ms": 10,
        "reconnect.backoff.max.ms": 1000,
    }


def prefetch_kb(settings: Settings) -> int:
    """`Settings.prefetch_kb`, checked against librdkafka's range (a clear error instead of the client's)."""
    if not PREFETCH_KB_MIN <= settings.prefetch_kb <= PREFETCH_KB_MAX:
        raise ConfigError(f"prefetch_kb (GUARD_PREFETCH_KB) must be between {PREFETCH_KB_MIN} and {PREFETCH_KB_MAX} "
                          f"kilobytes, got {settings.prefetch_kb}")
    return settings.prefetch_kb


def producer_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """A sanitizer worker's transactional producer settings (shared with the bench's plain loop)."""
    return {
        **client_config(settings),
        "client.id": client_id,
        "transactional.id": settings.transactional_id(),
        "transaction.timeout.ms": settings.transaction_timeout_ms,
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        # A transaction that starts right after the previous commit meets CONCURRENT_TRANSACTIONS until the
        # coordinator has written the markers; librdkafka retries after retry.backoff.ms (default 100 ms,
        # the Java client uses 20 ms here). 10 ms took the median commit cycle from ~45 ms to ~8 ms.
        "retry.backoff.ms": 10,
        # librdkafka doubles the back-off on each retry of the same request (up to 1 s by default): a
        # commit whose AddOffsetsToTxn met CONCURRENT_TRANSACTIONS four times in a row waited 10+20+40+80
        # ms, and such 60-150 ms stalls made most of the guard's p99 at half rate. Capped at 20 ms, a
        # retry waits no longer than the markers it is waiting for usually take.
        "retry.backoff.max.ms": 20,
        "reconnect.backoff.max.ms": 1000,
    }


def reveal_consumer_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """The reveal service's reader of sanitized records: assigned partitions only (no group membership, no
    commits), read_committed so an aborted or still-open transaction's record is never revealed."""
    return client_config(settings, **{
        "group.id": "branchguard-reveal",
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "auto.offset.reset": "error",
        # Each read assigns one partition at one offset: with the worker's 50 ms a single record took ~55 ms
        # to arrive, with 5 ms ~8 ms (the broker answers a fetch at a fresh position after this wait).
        "fetch.wait.max.ms": 5,
        "reconnect.backoff.max.ms": 1000,
    })


def audit_producer_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """The reveal service's audit producer: idempotent, every in-sync replica acknowledges, so an audit
    record acknowledged before plaintext is returned survives a broker failure."""
    return client_config(settings, **{
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": 15000,
        "reconnect.backoff.max.ms": 1000,
    })


class TopicManager:
    """Creates output topics on first use: sanitized topics get their raw topic's partition count."""

    def __init__(self, admin: AdminClient, *, config_ttl_s: float = 60.0) -> None:
        self._admin = admin
        self._partitions: dict[str, int] = {}
        self._configs: dict[str, tuple[dict[str, str] | None, float]] = {}
        self._config_ttl_s = config_ttl_s

    def configs(self, topic: str) -> dict[str, str] | None:
        """The topic's configuration (cleanup.policy, retention.ms, …), cached; None if it can't be read
        (the topic doesn't exist yet, or the broker doesn't answer)."""
        now = time.monotonic()
        cached = self._configs.get(topic)
        if cached is not None and cached[1] > now:
            return cached[0]
        result: dict[str, str] | None
        try:
            futures = self._admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
            entries = next(iter(futures.values())).result(timeout=10)
            result = {name: entry.value for name, entry in entries.items() if entry.value is not None}
        except Exception:  # noqa: BLE001 - unknown topic, timeout, broker error: "can't be read" (None)
            result = None
        self._configs[topic] = (result, now + self._config_ttl_s)
        return result

    def partitions(self, topic: str) -> int | None:
        if topic in self._partitions:
            return self._partitions[topic]
        # List all topics rather than asking for this one: a metadata request naming a missing topic
        # makes a broker with auto.create.topics.enable create it with the default partition count.
        for name, meta in self._admin.list_topics(timeout=10).topics.items():
            if meta.error is None and meta.partitions:
                self._partitions[name] = len(meta.partitions)
        return self._partitions.get(topic)

    def known(self, prefix: str) -> list[tuple[str, int]]:
        """Every (topic, partition) of the topics seen so far whose name starts with `prefix`."""
        return [(t, p) for t, n in list(self._partitions.items()) if t.startswith(prefix) for p in range(n)]

    def ensure_like(self, topic: str, source: str) -> int:
        """Partition count of output `topic`, created with `source`'s count if missing (runs per record)."""
        count = self._partitions.get(topic)
        if count is None:
            count = self.ensure(topic, self.partitions(source) or 1)
        return count

    def ensure(self, topic: str, partitions: int, config: dict[str, str] | None = None) -> int:
        existing = self.partitions(topic)
        if existing is not None:
            return existing
        # Replication factor -1: the cluster's `default.replication.factor`. A single-replica output
        # partition is leaderless whenever its broker restarts, and a transaction's markers sent at that
        # moment are skipped by the coordinator (a hanging transaction; guard.kafka.hanging).
        futures = self._admin.create_topics([NewTopic(topic, partitions, -1, config=config or {})])
        try:
            futures[topic].result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            count = self.partitions(topic)
            if count:
                return count
            time.sleep(0.2)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"topic {topic} did not appear"))
