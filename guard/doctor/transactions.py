"""Hanging transactions and the group's committed offsets: what leaves `read_committed` readers stuck (issue 18)."""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.doctor.check import Check, probe_logger
from guard.doctor.topics import output_partitions, raw_topics
from guard.kafka.hanging import StuckTracker, read_ends
from guard.kafka.partitioning import group_offsets_partition


def check_hanging_transactions(admin: AdminClient, settings: Settings, *, settle_s: float | None = None,
                               poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                               sleep: Callable[[float], None] = time.sleep) -> list[Check]:
    """Every output partition's LSO must reach its high watermark or move within the settle time.

    An open transaction of a live writer ends within its transaction timeout, so a partition whose last
    stable offset does not move for that long (plus the coordinator's clean-up margin) is hanging. Most
    runs return at once: nothing is unstable, or the unstable partitions move on the next poll.
    """
    limit = settle_s if settle_s is not None else settings.stuck_after_s
    partitions = output_partitions(admin, settings)
    tracker = StuckTracker(limit)
    start = clock()
    tracker.observe(start, read_ends(admin, partitions))
    while tracker.pending() and clock() - start <= limit:
        sleep(poll_s)
        hanging = tracker.observe(clock(), read_ends(admin, list(tracker.pending())))
        if hanging:
            return [Check("hanging transaction", False, h.describe(),
                          f"abort it: {h.abort_command} (local stack: `python -m guard.stack transactions "
                          f"--abort`); see docs/reliability.md") for h in hanging]
    return [Check("hanging transactions", True, f"none on {len(partitions)} output partitions (last stable "
                                                 "offsets reach the high watermarks or move)")]


def check_group_offsets(admin: AdminClient, settings: Settings, *, settle_s: float | None = None) -> list[Check]:
    """The group's committed offsets of the raw partitions must be readable the way its workers read them.

    A worker's consumer is `read_committed`, so it fetches them with `require_stable`, which the group
    coordinator answers with `UNSTABLE_OFFSET_COMMIT` while it holds offsets of the group pending in a
    transaction; librdkafka asks again until the call's timeout. A live worker's transaction holds them for
    milliseconds; for longer than the transaction timeout (plus the margin) they are stuck, and the group's
    workers hold their partitions and read nothing (`guard.kafka.fetching`, docs/reliability.md).
    """

    from confluent_kafka import Consumer, TopicPartition

    from guard.kafka.clients import consumer_config

    limit = settle_s if settle_s is not None else settings.stuck_after_s
    topics = admin.list_topics(timeout=10).topics
    partitions = [TopicPartition(t, p) for t in raw_topics(topics, settings) for p in sorted(topics[t].partitions)]
    name = f"committed offsets of group {settings.group_id}"
    if not partitions:
        return [Check(name, True, f"no raw topic matches {settings.raw_topic_pattern} yet")]
    offsets = topics.get("__consumer_offsets")
    where = (f"__consumer_offsets[{group_offsets_partition(settings.group_id, len(offsets.partitions))}]"
             if offsets is not None and offsets.partitions else "the group's __consumer_offsets partition")
    consumer = Consumer({**consumer_config(settings, "guard-doctor"), "logger": probe_logger})  # never joins the group
    try:
        start = time.monotonic()
        consumer.committed(partitions, timeout=limit)
    except KafkaException as exc:
        error = exc.args[0]
        if isinstance(error, KafkaError) and error.code() == KafkaError._TIMED_OUT:
            return [Check(name, False, f"not readable by read_committed consumers within {limit:.0f} s "
                                       f"({len(partitions)} raw partitions): held as pending in a transaction (or "
                                       f"the group coordinator does not answer), so the group's workers hold their "
                                       f"partitions and read nothing",
                          f"if a hanging transaction on {where} is named above, abort it; otherwise restart the "
                          f"broker that leads {where} (or move its leadership): see docs/reliability.md")]
        return [Check(name, False, f"reading them failed: {error}",
                      "check that the guard's principal may describe and read its group and raw topics (the local "
                      "stack grants it: guard/stack/kafka_auth.py), and that the cluster answers")]
    finally:
        consumer.close()
    return [Check(name, True, f"readable ({len(partitions)} raw partitions, {time.monotonic() - start:.1f} s)")]
