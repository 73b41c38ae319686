"""Erasure on request: `guard erase` crypto-shreds one data subject and publishes the confirmation.

An erasure's records (the deletion confirmation, its audit record, the tombstones for compacted topics and the
run's audit checkpoints) are written in one Kafka transaction (`ErasureWriter`), committed before the pending
entry the shred stored is forgotten. All of them or none: a worker that finds the confirmation's id on
`guard.deletions` (`guard.kafka.maintenance.Maintenance.redeliver_pending`) can forget the entry, because the
tombstones and the audit record were committed with it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from guard.audit.writer import OneShotChains, load_audit_signer
from guard.classify.catalog import ERASURE_REASONS
from guard.config import Settings
from guard.errors import GuardError
from guard.kafka_security import client_config
from guard.pipeline.runtime import build_sanitizer
from guard.pipeline.sanitizer import Sanitizer
from guard.records.builders import OutRecord

log = logging.getLogger(__name__)

REASONS = ERASURE_REASONS


def erase_subject(settings: Settings, subject_id: str, reason_code: str, by: str) -> dict[str, Any]:
    """Shred (or hold) the subject, write confirmation + audit record, wait until Kafka has them.

    The confirmation is stored in the key store with the shred (`Sanitizer.erase`), so if publishing it
    fails, running workers deliver it (once) instead (`guard.kafka.confirmations`). A subject erased
    before gets no second confirmation: the answer names the first one.
    """
    sanitizer = erasure_sanitizer(settings)
    run = uuid.uuid4()
    sanitizer.owner = f"cli:{by}#{run}"
    writer = ErasureWriter(settings, run)  # before the shred: a producer Kafka refuses stops the erasure here
    subject = sanitizer.keys.subject_token(settings.branch, subject_id)
    records = sanitizer.erase(subject, trigger="erase_command", reason_code=reason_code,
                              reason=REASONS[reason_code], by=by)
    writer.publish(records, sanitizer, by)
    if not any(r.topic == settings.deletions_topic for r in records):
        first = sanitizer.keys.store.erased_record(settings.branch, subject)
        return {"type": "already_erased", "subject": subject, "branch": settings.branch, "outcome": "already_erased",
                "first_confirmation": orjson.loads(first).get("id") if first else None,
                "confirmation_pending": sanitizer.keys.store.pending_confirmation(settings.branch, subject) is not None}
    _forget_pending(sanitizer)
    confirmation: dict[str, Any] = orjson.loads(next(r.value for r in records
                                                     if r.topic == settings.deletions_topic) or b"{}")
    if confirmation.get("keys_destroyed"):
        _compact(sanitizer)
    return confirmation


def sweep_retention(
    settings: Settings, *, now: float | None = None, by: str = "retention-sweep"
) -> list[dict[str, Any]]:
    """Erase every subject of the branch whose retention ran out (PIPL Art. 19 and 47(2)).

    Expiry is last change + the retention of the tables the subject's data sits in (catalog, per table or
    per class). Run it from cron or a scheduler; it is idempotent and safe to run from several places.
    A subject under legal hold is skipped and keeps its expiry entry, so it is erased by the first sweep
    after the hold is released; a subject erased before is only removed from the expiry set.
    """
    sanitizer = erasure_sanitizer(settings)
    run = uuid.uuid4()
    sanitizer.owner = f"cli:{by}#{run}"
    writer = ErasureWriter(settings, run)
    store = sanitizer.keys.store
    now = time.time() if now is None else now
    confirmations: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        while True:
            expired = [s for s in store.expired_subjects(settings.branch, now, limit=1000 + len(seen))
                       if s not in seen]
            if not expired:
                return confirmations
            for subject in expired:
                seen.add(subject)
                if store.is_held(settings.branch, subject):
                    continue
                records = sanitizer.erase(subject, trigger="retention_expiry",
                                          reason_code="art47_2_retention_expired",
                                          reason=REASONS["art47_2_retention_expired"], by=by)
                writer.publish(records, sanitizer, by)
                _forget_pending(sanitizer)
                for rec in records:
                    if rec.topic == settings.deletions_topic and rec.value:
                        confirmation = orjson.loads(rec.value)
                        confirmations.append(confirmation)
                        if confirmation["outcome"] == "held_storage_only":
                            break
                else:
                    store.forget_expiry(settings.branch, subject)
    finally:
        if confirmations:
            _compact(sanitizer)


def release_hold(settings: Settings, subject_id: str, by: str) -> dict[str, Any] | None:
    """Lift a legal hold; an erasure the hold deferred (storage-only) is carried out now.

    Returns that erasure's confirmation, or None when none was deferred. The erasure keeps the reason it
    was requested with; a deferred erasure recorded without one (before this version) is not guessed:
    the error says to run `guard erase` with the right reason.
    """
    sanitizer = erasure_sanitizer(settings)
    run = uuid.uuid4()
    sanitizer.owner = f"cli:{by}#{run}"
    writer = ErasureWriter(settings, run)
    store, subject = sanitizer.keys.store, sanitizer.keys.subject_token(settings.branch, subject_id)
    store.set_hold(settings.branch, subject, False)
    raw = store.storage_only(settings.branch, subject)
    if raw is None:
        return None
    try:
        deferred = orjson.loads(raw)
        reason_code, reason = deferred["reason_code"], deferred["reason"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise GuardError("the hold is released, but the deferred erasure was recorded without its reason: run "
                         "`guard erase --subject ID --reason ... --by WHO` to erase the customer") from None
    records = sanitizer.erase(subject, trigger="hold_released", reason_code=reason_code,
                              reason=f"{reason} (deferred by a legal hold until its release)", by=by)
    writer.publish(records, sanitizer, by)
    _forget_pending(sanitizer)
    store.clear_storage_only(settings.branch, subject)
    _compact(sanitizer)
    return next((orjson.loads(r.value) for r in records if r.topic == settings.deletions_topic and r.value), None)


def _forget_pending(sanitizer: Sanitizer) -> None:
    """The confirmations just committed are delivered (with their audit records and tombstones): their
    pending entries can go."""
    carried, sanitizer.pending_in_txn = dict(sanitizer.pending_in_txn), {}
    try:
        sanitizer.keys.store.confirm_delivered(sanitizer.branch, carried)
    except GuardError as exc:
        log.warning("published confirmations stay pending in the key store (%s); workers find them on the "
                    "deletions topic and forget them", exc)


def _compact(sanitizer: Sanitizer) -> None:
    """Wait for the append-only-file rewrite that removes the destroyed keys from Redis's disk."""
    try:
        sanitizer.keys.store.compact()
    except GuardError as exc:
        log.warning("the append-only-file rewrite after the shred did not complete (%s); the key store keeps "
                    "it due (bg:{t}:compact-shreds above compact-covered) and running workers finish it", exc)


def erasure_sanitizer(settings: Settings) -> Sanitizer:
    """A sanitizer that reads the sanitized topics' configurations (compaction, retention) from Kafka."""
    sanitizer = build_sanitizer(settings)
    sanitizer.emitter.signer = load_audit_signer(settings)  # confirmations are signed; no key, no erasure
    admin = AdminClient(client_config(settings))
    cache: dict[str, dict[str, str] | None] = {}

    def topic_configs(topic: str) -> dict[str, str] | None:
        if topic not in cache:
            try:
                future = next(iter(admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()))
                cache[topic] = {n: e.value for n, e in future.result(timeout=10).items() if e.value is not None}
            except Exception:  # noqa: BLE001 - unknown topic, timeout: the confirmation says "unknown"
                cache[topic] = None
        return cache[topic]

    sanitizer.topic_configs = topic_configs
    return sanitizer


class ErasureWriter:
    """The Kafka writes of one run of `guard erase`, `guard retention` or `guard hold --release`: each
    `publish` is one transaction, committed or aborted before it returns.

    Why a transaction: with a plain (idempotent) producer the confirmation could land while a tombstone
    did not (its partition's leader away longer than the flush). The command failed, but a worker's
    maintenance then found the confirmation's id on the deletions topic and forgot the pending entry, so the
    tombstone and the audit record were never written while the confirmation said they were, and compaction
    kept the customer. Committed together, a confirmation on the topic means every record of its erasure is.

    The transactional id is the run's own, `<group_id>-erase-<run>` (under the workers' prefix, so the
    principal that may use the workers' transactional ids may use it: the local stack's `guard`). Its
    `transaction.timeout.ms` is `transaction_timeout_ms`, the time after which a worker takes a pending
    entry over (plus a margin, `guard.kafka.confirmations.due`): by then this run's transaction, if the
    process died with it open, has been aborted by Kafka, so a worker never writes a second copy beside it.
    """

    def __init__(self, settings: Settings, run: uuid.UUID | str) -> None:
        self.settings = settings
        self.transactional_id = f"{settings.group_id}-erase-{run}"
        self.wait_s = max(1.0, settings.transaction_timeout_ms / 1000)
        self.producer = Producer(client_config(settings, **{
            "enable.idempotence": True, "transactional.id": self.transactional_id,
            "transaction.timeout.ms": settings.transaction_timeout_ms}))
        try:
            self.producer.init_transactions(60)
        except KafkaException as exc:
            raise GuardError(self._start_failed(exc)) from None

    def _start_failed(self, exc: KafkaException) -> str:
        """What to do when the transactional producer can't start; nothing is erased yet."""
        err = exc.args[0] if exc.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        s = self.settings
        principal = (f"User:{s.kafka_username}" if s.kafka_security_protocol.upper().startswith("SASL")
                     else "the erase command's Kafka principal")
        if code == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            return (f"Kafka refused the transactional id {self.transactional_id} to {principal}: the erasure's "
                    "records are written in one transaction, which needs the ACL ALLOW "
                    f"{principal} WRITE and DESCRIBE on TRANSACTIONAL_ID, pattern PREFIXED, name "
                    f"'{s.group_id}-erase-' (a shorter prefix such as '{s.group_id}' covers it, as the workers' "
                    "grant on the local stack does). Nothing was erased: add the ACL (kafka-acls --add "
                    f"--allow-principal {principal} --operation Write --operation Describe --transactional-id "
                    f"'{s.group_id}-erase-' --resource-pattern-type prefixed) and run the command again")
        if code == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
            return (f"Kafka refused {principal} the idempotent writes a transactional producer makes: grant it "
                    f"WRITE and DESCRIBE on TRANSACTIONAL_ID, pattern PREFIXED, name '{s.group_id}-erase-' (older "
                    "brokers also want IDEMPOTENT_WRITE on the CLUSTER). Nothing was erased: run the command "
                    "again once it is granted")
        return (f"the erasure's transactional Kafka producer could not start ({exc}); nothing was erased: check "
                "that Kafka is reachable (`guard doctor`) and run the command again")

    def publish(self, records: list[OutRecord], sanitizer: Sanitizer, by: str) -> None:
        """Write the records, and the checkpoints of their audit chains, in one transaction and commit it.

        Any failure (a delivery report with an error, records left after the wait, the commit) aborts the
        transaction and raises, so none of them is committed and the pending entries stay for the workers.
        The chains are this write's own (`OneShotChains`); once committed, their checkpoints are copied to
        the second store (docs/audit.md).
        """
        if not records:
            return
        settings = self.settings
        signer = sanitizer.emitter.signer
        chains = OneShotChains(settings, signer, by) if signer is not None else None
        stamped = [(rec, chains.headers(rec.topic, rec.key, rec.value, rec.headers) if chains else rec.headers)
                   for rec in records]
        notes: list[tuple[str, int, str]] = []
        if chains is not None:
            checkpoints, notes = chains.checkpoints(sanitizer.emitter.checkpoint)
            stamped += [(rec, rec.headers) for rec in checkpoints if isinstance(rec, OutRecord)]
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(f"{msg.topic()} [{msg.partition()}]: {err.str()}")

        problem = ""
        producer = self.producer
        try:
            producer.begin_transaction()
            for rec, headers in stamped:
                # Tombstones go to the partition of the record they remove (the raw record's partition).
                producer.produce(rec.topic, rec.value, rec.key,
                                 partition=-1 if rec.partition is None else rec.partition,
                                 timestamp=rec.timestamp or 0, on_delivery=on_delivery, headers=headers)
            left = producer.flush(self.wait_s)
            if left or failures:
                problem = "; ".join(failures) or f"{left} records undelivered after {self.wait_s:g} s"
            else:
                self._commit()
        except (KafkaException, BufferError) as exc:
            problem = problem or str(exc)
        if problem:
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(self.wait_s)
            raise GuardError(self._not_committed(problem, records))
        try:
            sanitizer.keys.store.put_audit_checkpoints(settings.audit_topic, notes)
        except GuardError as exc:
            log.warning("the audit checkpoints of this run are on %s but not in the second store (%s)",
                        settings.audit_topic, exc)

    def _commit(self) -> None:
        """Commit the open transaction. A retriable failure (a timeout: the commit may still be under way) is
        retried, as librdkafka asks, before the caller gives up and aborts."""
        for attempt in range(3):
            try:
                self.producer.commit_transaction(self.wait_s)
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if attempt == 2 or not (isinstance(err, KafkaError) and err.retriable()):
                    raise

    def _not_committed(self, problem: str, records: list[OutRecord]) -> str:
        """The error of a failed write: what happened, what is kept, and what the operator should do."""
        s = self.settings
        tombstones = sum(1 for r in records if r.value is None)
        what = "the deletion confirmation, its audit record" + (
            f" and {tombstones} tombstone{'s' if tombstones > 1 else ''}" if tombstones else "")
        return (f"{what} were not committed to Kafka ({problem}); the transaction ({self.transactional_id}) "
                "was aborted. They are one transaction: all of them are committed or none, never a confirmation "
                "without its tombstones. The erasure itself is done in the key store (the key destroyed, or, "
                "for a customer under legal hold, the erasure deferred), and the confirmation, with its audit "
                f"record and tombstones, is kept in the key store: a running worker of branch {s.branch} "
                f"(`guard run`) looks for it on {s.deletions_topic} and, if it is not there, writes them all "
                f"once, in a transaction of its own, about {s.transaction_timeout_ms // 1000 + 30} s after the "
                "erasure (transaction_timeout_ms + 30 s). What to do: check that every partition of those "
                "topics has a leader (`guard doctor`) and that a worker of the branch runs; `guard erase` of "
                "the same subject then answers `already_erased` with `confirmation_pending: true` until the "
                "worker has written them")
