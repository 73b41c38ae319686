"""The reveal service's Kafka side: reading one sanitized record by position, and writing audit records.

`RecordFetcher` reads a record by (topic, partition, offset) with `read_committed`, so what it returns was
committed by a sanitizer transaction: a record of an aborted or still-open transaction, a transaction
marker or an offset beyond the end is "not found", never read. It reads only topics under the sanitized
prefix (`sanitized_prefix`): a reference can't point the service at a raw CDC topic, the DLQ or anything
else the guard's Kafka principal may read.

`AuditSink` produces audit records and waits for the broker's acknowledgement (`acks=all`): the service
returns plaintext only after the audit records of the call are stored, and fails the call otherwise.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from guard.audit.note import Signer
from guard.audit.writer import OneShotChains
from guard.config import Settings
from guard.errors import GuardError
from guard.kafka.clients import audit_producer_config, reveal_consumer_config
from guard.records.builders import OutRecord

#: Kafka's own limit on topic names; legal characters only.
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class AuditUnavailableError(GuardError):
    """Audit records could not be stored: the call is refused (no plaintext without its audit record)."""


class RecordUnavailableError(GuardError):
    """Kafka did not answer in time: the record may exist, the service can't say (the caller retries)."""


class RecordNotAuthorizedError(RecordUnavailableError):
    """The service's Kafka principal may not read the topic: a deployment error, not an outage."""


_NOT_AUTHORIZED = (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                   KafkaError.CLUSTER_AUTHORIZATION_FAILED)


@dataclass(frozen=True, slots=True)
class FetchedRecord:
    key: bytes | None
    value: bytes | None


class RecordFetcher:
    """Reads single committed records of sanitized topics by position (one consumer, serialised)."""

    def __init__(self, settings: Settings, *, timeout_s: float = 10.0) -> None:
        self.prefix = settings.sanitized_prefix
        self.principal = settings.kafka_username
        self._timeout_s = timeout_s
        self._consumer = Consumer(reveal_consumer_config(settings, f"reveal-{socket.gethostname()}"))
        self._lock = threading.Lock()

    def allowed_topic(self, topic: str) -> bool:
        """Whether a reference may name this topic: a sanitized topic, nothing else."""
        return bool(_TOPIC_RE.match(topic)) and topic.startswith(self.prefix) and len(topic) > len(self.prefix)

    def fetch(self, topic: str, partition: int, offset: int) -> FetchedRecord | None:
        """The committed record at this position; None when there is none (or it is not committed)."""
        if not self.allowed_topic(topic) or partition < 0 or offset < 0:
            return None
        with self._lock:
            try:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                                 timeout=self._timeout_s, cached=False)
            except KafkaException as exc:
                if exc.args and exc.args[0].code() in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                       KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC):
                    return None
                if exc.args and exc.args[0].code() in _NOT_AUTHORIZED:
                    raise self._not_authorized(topic) from None
                raise RecordUnavailableError(f"Kafka did not answer for {topic} [{partition}]") from None
            if offset < low or offset >= high:
                return None
            self._consumer.assign([TopicPartition(topic, partition, offset)])
            try:
                return self._read(offset, topic)
            finally:
                self._consumer.unassign()

    def _read(self, offset: int, topic: str = "?") -> FetchedRecord | None:
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            msg = self._consumer.poll(min(0.5, max(0.01, deadline - time.monotonic())))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return None  # reached the last stable offset: the record is aborted or not yet committed
                if err.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                    return None
                if err.code() in _NOT_AUTHORIZED:
                    raise self._not_authorized(msg.topic() or topic)
                continue
            found = msg.offset()
            if found is None or found < offset:
                continue
            if found > offset:
                return None  # skipped: the offset held an aborted record or a transaction marker
            return FetchedRecord(msg.key(), msg.value())
        raise RecordUnavailableError("Kafka did not deliver the record in time")

    def _not_authorized(self, topic: str) -> RecordNotAuthorizedError:
        logging.getLogger("guard.reveal").error(
            "the reveal service's Kafka principal %r may not read %s: run it as the `reveal` principal "
            "(GUARD_KAFKA_USERNAME=reveal, GUARD_KAFKA_PASSWORD_FILE=<stack home>/secrets/kafka-reveal.password; "
            "docs/reveal.md)", self.principal, topic)
        return RecordNotAuthorizedError(f"{self.principal} may not read {topic}")

    def close(self) -> None:
        with self._lock:
            self._consumer.close()


#: Where a call's checkpoints go besides the topic: (audit topic, [(chain, size, note)]) → None.
CheckpointStore = Callable[[str, list[tuple[str, int, str]]], None]


class AuditSink:
    """Writes a call's audit records and returns once the broker has acknowledged every one.

    With a signer, each call's records are a chain of their own (`OneShotChains`, as `guard erase` writes
    them: ``audit/cli:reveal-<host>/<random>``), checkpointed in the same write, so `guard audit verify`
    covers every reveal and search; once Kafka has them the checkpoints go to the second store too.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 15.0, signer: Signer | None = None,
                 checkpoint: Callable[[str, int, str], OutRecord] | None = None,
                 store: CheckpointStore | None = None) -> None:
        self._settings = settings
        self._producer = Producer(audit_producer_config(settings, f"reveal-audit-{socket.gethostname()}"))
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._signer, self._checkpoint, self._store = signer, checkpoint, store

    def _chained(self, records: list[OutRecord]) -> tuple[list[OutRecord], list[tuple[str, int, str]]]:
        if self._signer is None or self._checkpoint is None:
            return records, []
        chains = OneShotChains(self._settings, self._signer, f"reveal-{socket.gethostname()}")
        out = [OutRecord(r.topic, r.key, r.value, partition=r.partition, timestamp=r.timestamp,
                         headers=chains.headers(r.topic, r.key, r.value, r.headers)) for r in records]
        checkpoints, notes = chains.checkpoints(self._checkpoint)
        return out + [c for c in checkpoints if isinstance(c, OutRecord)], notes

    def write(self, records: list[OutRecord]) -> None:
        records, notes = self._chained(records)
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                failures.append(err.name())

        with self._lock:
            try:
                for rec in records:
                    self._producer.produce(rec.topic, rec.value, rec.key, headers=rec.headers, on_delivery=delivered)
            except (KafkaException, BufferError) as exc:
                self._producer.flush(self._timeout_s)  # what was queued goes out or fails; it is not answered on
                raise AuditUnavailableError(f"audit records not accepted by the producer ({type(exc).__name__})") \
                    from None
            left = self._producer.flush(self._timeout_s)
        if left or failures:
            raise AuditUnavailableError(
                f"audit records not acknowledged ({left} pending, failures: {sorted(set(failures))})")
        if notes and self._store is not None:
            try:
                self._store(self._settings.audit_topic, notes)
            except GuardError as exc:  # the topic has them; a missing copy weakens only what a later cut can hide
                logging.getLogger("guard.reveal").warning(
                    "the audit checkpoints of a reveal call are on %s but not in the second store (%s)",
                    self._settings.audit_topic, exc)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
