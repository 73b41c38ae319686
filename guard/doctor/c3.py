"""No C3 (authentication) value in a raw topic (issue 13 item 8): the latest records of each raw partition."""

from __future__ import annotations

import time

from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.doctor.check import Check
from guard.doctor.topics import raw_topics
from guard.errors import ConfigError
from guard.kafka_security import client_config

#: Records read from the end of each raw partition by the C3 check.
C3_SAMPLE = 200


def _raw_table(settings: Settings, topic: str) -> str:
    """`br0101.public.customer_auth` -> `public.customer_auth`."""
    return topic[len(settings.raw_topic_prefix) + 1:]


def c3_violations(image: object, drop: set[str], hashed: set[str]) -> list[str]:
    """The C3 columns of one `before`/`after` image that reached Kafka in clear (pure; unit-tested)."""
    from guard.classify.source import is_source_hash

    if not isinstance(image, dict):
        return []
    found = sorted(c for c in drop if c in image)
    found += sorted(c for c in hashed if image.get(c) is not None and not is_source_hash(image[c]))
    return found


def latest_records(settings: Settings, topic: str, partitions: list[int], sample: int,
                   timeout: float = 20.0) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of the last `sample` records of each partition."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(client_config(settings, **{"group.id": f"guard-doctor-{uuid.uuid4()}",
                                                   "enable.auto.commit": False, "auto.offset.reset": "earliest"}))
    try:
        ends: dict[int, int] = {}
        starts = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, max(low, high - sample)))
        out: list[tuple[int, int, bytes | None]] = []
        if not starts:
            return out
        consumer.assign(starts)
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                part, off = msg.partition(), msg.offset()
                if part is None or off is None:
                    continue
                if off < ends[part]:
                    out.append((part, off, msg.value()))
                if off + 1 >= ends[part]:
                    done.add(part)
        return out
    finally:
        consumer.close()


def check_c3_absent(admin: AdminClient, settings: Settings, *, sample: int = C3_SAMPLE) -> list[Check]:
    """No C3 column of the catalog is in the latest records of a raw topic: `drop` columns are not keys of
    `before`/`after`, `hash` columns hold only Debezium's 64-hex digest."""

    import orjson

    from guard.classify.catalog import Action, Catalog

    try:
        catalog = Catalog.load(settings.catalog or None)
    except ConfigError as exc:
        return [Check("C3 in raw topics", False, str(exc), "fix the catalog (GUARD_CATALOG)")]
    topics = admin.list_topics(timeout=10).topics
    raw = raw_topics(topics, settings)
    out: list[Check] = []
    scanned = checked = 0
    for topic in raw:
        policy = catalog.table(_raw_table(settings, topic))
        if policy is None:
            continue
        drop = {c for c, col in policy.columns.items() if col.data_class == "C3" and col.action is Action.DROP}
        hashed = {c for c, col in policy.columns.items() if col.data_class == "C3" and col.action is Action.HASH}
        if not drop and not hashed:
            continue
        bad: dict[str, tuple[int, int]] = {}
        checked += 1
        records = latest_records(settings, topic, sorted(topics[topic].partitions), sample)
        scanned += len(records)
        for partition, offset, value in records:
            try:
                doc = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("payload"), dict):
                doc = doc["payload"]
            if not isinstance(doc, dict):
                continue
            for image in ("before", "after"):
                for column in c3_violations(doc.get(image), drop, hashed):
                    bad.setdefault(column, (partition, offset))
        for column, (partition, offset) in sorted(bad.items()):
            how = "excluded" if column in drop else "hashed"
            out.append(Check(f"C3 in {topic}", False,
                             f"column {column} is in clear in the raw records (first seen: partition {partition}, "
                             f"offset {offset}); the catalog says it is {how} at the source",
                             "render and register the connector from the catalog: `guard connector apply` (local "
                             "stack: `guard stack up`); records already written stay until the raw topics' "
                             "retention (3 days) removes them, or delete the raw topic"))
    if not out:
        out.append(Check(f"C3 in raw topics {settings.raw_topic_prefix}.*", True,
                         f"no C3 column of the catalog in the latest {sample} records of each partition ({scanned} "
                         f"records of {checked} raw topics with C3 columns; {len(raw)} raw topics)"))
    return out
