"""A worker's consumer fetches a bounded amount ahead of it (`Settings.prefetch_kb`), on the real broker.

Why it matters: a worker that falls behind its input (a stall, a backlog after a restart) would otherwise let
librdkafka fill its default 64 MiB of prefetched records plus their per-record overhead, memory the worker
can't use yet; a 10-minute soak grew by ~100 MiB that way (docs/benchmark.md, round 25).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from guard.config import load_settings
from guard.kafka.clients import consumer_config
from tests.integration.kafka_helpers import kafka_conf

pytestmark = pytest.mark.integration

RECORD = 2048
BACKLOG_MIB = 48
BOUND_KB = 8192


def test_the_consumer_fetches_ahead_no_more_than_its_bound(stack: dict[str, str]) -> None:
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    topic = f"prefetch-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_conf(bootstrap))
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    try:
        producer = Producer({**kafka_conf(bootstrap), "linger.ms": 20, "compression.type": "none"})
        value = bytes(RECORD)
        for n in range(BACKLOG_MIB * 2**20 // RECORD):
            while True:
                try:
                    producer.produce(topic, value, str(n).encode(), partition=n % 2)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(60) == 0

        settings = load_settings(group_id=f"prefetch-{uuid.uuid4().hex[:8]}", prefetch_kb=BOUND_KB)
        stats: list[int] = []

        def on_stats(text: str) -> None:
            # A partition's `fetchq_size` is the bytes queued for the application: the consumer's one queue,
            # which every partition's fetch queue forwards to.
            doc: dict[str, Any] = json.loads(text)
            parts = doc.get("topics", {}).get(topic, {}).get("partitions", {})
            stats.append(max((p.get("fetchq_size", 0) for k, p in parts.items() if k != "-1"), default=0))

        consumer = Consumer({**consumer_config(settings, "prefetch-test"), **kafka_conf(bootstrap),
                             "statistics.interval.ms": 200, "stats_cb": on_stats})
        consumer.subscribe([topic])
        try:
            taken = seen = since_peak = best = 0
            deadline = time.monotonic() + 90
            # A worker far behind its input: one record now and then (the statistics are served meanwhile),
            # until half the bound is ahead and ten statistics in a row found no more than before.
            while time.monotonic() < deadline and (since_peak < 10 or best < BOUND_KB * 1024 // 2):
                taken += len(consumer.consume(1, 0.2))
                time.sleep(0.1)
                for size in stats[seen:]:
                    best, since_peak = (size, 0) if size > best else (best, since_peak + 1)
                seen = len(stats)
            assert taken > 0 and stats, "the consumer read nothing from the backlog"
            peak = max(stats)
            # The bound plus a fetch response in flight per partition (max.partition.fetch.bytes, 1 MiB).
            assert peak <= BOUND_KB * 1024 + 2 * 2**20, f"{peak / 2**20:.1f} MiB fetched ahead"
            assert peak >= BOUND_KB * 1024 // 2, f"only {peak / 2**20:.1f} MiB fetched ahead: the bound was not reached"
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(30)
