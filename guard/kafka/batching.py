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

Committing too: a batch's offsets go to the open transaction while the batch is transformed
(`EarlyOffsets`), so the commit itself is one round trip.
"""

from __future__ import annotations

import concurrent.futures
import logging

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

log = logging.getLogger(__name__)

#: (partition -> last offset of the transaction, the `send_offsets_to_transaction` call carrying them)
_Pending = tuple[dict[tuple[str, int], int], "concurrent.futures.Future[None]"]


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


class EarlyOffsets:
    """A transaction's offsets, sent to it on the transactional helper thread while the batch is transformed.

    A commit used to be three round trips in a row with the loop idle: AddOffsetsToTxn, TxnOffsetCommit,
    then EndTxn. The first two only need the offsets, which are known once the batch is fetched, so they
    run on the helper thread while the main thread transforms and produces; right after a commit they also
    absorb the coordinator's CONCURRENT_TRANSACTIONS retries. Safe for exactly-once because offsets sent to
    a transaction count only if it commits: an abort, a crash or a fenced producer drops them with the
    records. The commit relies on them only if `cover` says the last send succeeded with exactly the
    offsets it would send; otherwise it sends them itself.
    """

    def __init__(self) -> None:
        self.pending: _Pending | None = None

    def send(self, pool: concurrent.futures.Executor, producer: Producer, consumer: Consumer,
             ends: dict[tuple[str, int], int], timeout_s: float,
             metadata: dict[tuple[str, int], str] | None = None) -> None:
        """Send `ends` (partition -> last offset taken) to the open transaction on `pool`'s thread, with
        each partition's commit `metadata` if given (the audit chains' tails)."""
        meta = metadata or {}
        offsets = [TopicPartition(t, p, o + 1, meta[(t, p)]) if (t, p) in meta else TopicPartition(t, p, o + 1)
                   for (t, p), o in ends.items()]
        self.pending = (dict(ends), pool.submit(producer.send_offsets_to_transaction, offsets,
                                          consumer.consumer_group_metadata(), timeout_s))

    def cover(self, last: dict[tuple[str, int], int], wait_s: float) -> bool:
        """Whether the last send finished and holds exactly `last`; a send is used once.

        Raises `concurrent.futures.TimeoutError` if the send is still running after `wait_s`.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        ends, future = pending
        try:
            future.result(timeout=wait_s)
        except KafkaException as exc:
            # The commit's own send retries a retriable error and reports one that needs an abort.
            log.info("sending the offsets early failed (%s); sending them with the commit", exc)
            return False
        return ends == last

    def settle(self) -> None:
        """Wait for a send still running, then forget it: before another transactional call on this thread."""
        if self.pending is not None:
            concurrent.futures.wait([self.pending[1]])
        self.pending = None

    def forget(self) -> None:
        """Drop the send (its transaction is over, or its producer replaced)."""
        self.pending = None
