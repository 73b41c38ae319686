"""Reading a topic to its end: the committed records from a start to the end the topic had when asked.

Several parts of the guard read a whole topic or its recent past and must know when they are done: the
audit-chain verifier (every leaf and checkpoint of ``guard.audit``), the check of which deletion
confirmations are already delivered, the transfer report. "Done" is the end offset each partition had at
the start (records appended later are not waited for), reached either by a record at that offset or by
the partition-EOF event (under ``read_committed`` the last offsets may be transaction markers, which are
never delivered as records). A reader waits on *progress*: it fails only when neither a record nor an EOF
came for ``stall_s``, never because a fixed deadline was tuned on a fast machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, Message, TopicPartition

from guard.errors import GuardError

#: Settings a consumer must have for `read_to_end` (the caller adds its security settings and group id).
READER_SETTINGS = {"enable.auto.commit": False, "isolation.level": "read_committed",
                   "enable.partition.eof": True}


class TopicMissingError(GuardError):
    """The topic does not exist, or the principal may not describe it."""


class TopicReadError(GuardError):
    """Reading stopped making progress, or the broker returned an error for the topic."""


def read_to_end(consumer: Consumer, topic: str, *, since_ms: int = 0, stall_s: float = 60.0) -> Iterator[Message]:
    """Every committed record of `topic` from `since_ms` (0: the beginning) to the end it has now.

    `consumer` must carry `READER_SETTINGS` and must not be subscribed: partitions are assigned at explicit
    offsets, so the reader never joins a group or commits. Records come partition by partition in offset
    order, interleaved across partitions.
    """
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        raise TopicMissingError(f"topic {topic} does not exist or may not be described by this principal")
    parts = sorted(meta.partitions)
    ends = {p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]) for p in parts}
    starts = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in parts], timeout=10) \
        if since_ms else [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts]
    assign = [tp for tp in starts if ends[tp.partition] > 0 and tp.offset != OFFSET_END
              and (tp.offset < 0 or tp.offset < ends[tp.partition])]
    if not assign:
        return
    consumer.assign(assign)
    open_parts = {tp.partition for tp in assign}
    last_progress = time.monotonic()
    while open_parts:
        batch = consumer.consume(1000, 0.5)
        if not batch:
            if time.monotonic() - last_progress > stall_s:
                raise TopicReadError(f"reading {topic} made no progress for {stall_s:.0f} s "
                                     f"(partitions still open: {sorted(open_parts)})")
            continue
        last_progress = time.monotonic()
        for msg in batch:
            err = msg.error()
            partition: int = msg.partition()  # type: ignore[assignment]
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(partition)
                    continue
                raise TopicReadError(f"reading {topic}: {err}")
            offset: int = msg.offset()  # type: ignore[assignment]
            if offset >= ends[partition]:  # appended after the call: not ours to wait for or return
                open_parts.discard(partition)
                continue
            yield msg
            if offset + 1 >= ends[partition]:
                open_parts.discard(partition)
