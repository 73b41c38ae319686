"""When a consume-transform-produce loop takes records and when it commits (shared by the guard's runner
and the benchmark's plain loop, so the two always batch the same way).

A transaction is committed when it holds `batch_size` records, when it is `batch_ms` old, or as soon as
the consumer has nothing more fetched (the loop caught up). Under a backlog the first two keep
transactions large and their fixed cost (several broker round trips) small per record; at a lower rate
the third commits right after the records that arrived, so a record waits for processing and one commit,
not for a full window.

Fetching follows the same idea: with no transaction open the loop blocks on `poll()`, which returns as
soon as one record arrives (librdkafka's batch `consume()` would wait its whole timeout unless the batch
filled), then takes whatever else is already fetched without waiting.
"""

from __future__ import annotations

from confluent_kafka import Consumer, Message


def take(consumer: Consumer, limit: int, wait_s: float) -> tuple[list[Message], bool]:
    """Up to `limit` records and whether the fetched queue is now drained.

    `wait_s` > 0 blocks up to that long for the first record (an idle loop); 0 only takes what is there.
    """
    if wait_s > 0:
        first = consumer.poll(wait_s)
        if first is None:
            return [], True
        rest = consumer.consume(limit - 1, 0) if limit > 1 else []
        return [first, *rest], len(rest) < limit - 1
    msgs = consumer.consume(limit, 0)
    return msgs, len(msgs) < limit


def commit_due(*, drained: bool, records: int, batch_size: int, age_s: float, batch_s: float) -> bool:
    """Whether the open transaction should commit now."""
    return drained or records >= batch_size or age_s >= batch_s
