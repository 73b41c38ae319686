"""Erasure on request: `guard erase` crypto-shreds one data subject and publishes the confirmation."""

from __future__ import annotations

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
    sanitizer.owner = f"cli:{by}#{uuid.uuid4()}"
    subject = sanitizer.keys.subject_token(settings.branch, subject_id)
    records = sanitizer.erase(subject, trigger="erase_command", reason_code=reason_code,
                              reason=REASONS[reason_code], by=by)
    _publish(settings, records, sanitizer, by)
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
    sanitizer.owner = f"cli:{by}#{uuid.uuid4()}"
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
                _publish(settings, records, sanitizer, by)
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
    sanitizer.owner = f"cli:{by}#{uuid.uuid4()}"
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
    _publish(settings, records, sanitizer, by)
    _forget_pending(sanitizer)
    store.clear_storage_only(settings.branch, subject)
    _compact(sanitizer)
    return next((orjson.loads(r.value) for r in records if r.topic == settings.deletions_topic and r.value), None)


def _forget_pending(sanitizer: Sanitizer) -> None:
    """The confirmations just published are delivered: their pending entries can go."""
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


def _publish(settings: Settings, records: list[OutRecord], sanitizer: Sanitizer, by: str) -> None:
    """Write the records and wait for each delivery report; any failure raises (none is ignored).

    The audit and deletion records form chains of this run (`OneShotChains`), checkpointed in the same
    write; once Kafka has them, the checkpoints are copied to the second store (docs/audit.md).
    """
    if not records:
        return
    signer = sanitizer.emitter.signer
    chains = OneShotChains(settings, signer, by) if signer is not None else None
    stamped = [(rec, chains.headers(rec.topic, rec.key, rec.value, rec.headers) if chains else rec.headers)
               for rec in records]
    notes: list[tuple[str, int, str]] = []
    if chains is not None:
        checkpoints, notes = chains.checkpoints(sanitizer.emitter.checkpoint)
        stamped += [(rec, rec.headers) for rec in checkpoints if isinstance(rec, OutRecord)]
    producer = Producer(client_config(settings, **{"enable.idempotence": True}))
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(f"{msg.topic()}: {err.str()}")

    for rec, headers in stamped:
        try:
            # Tombstones go to the partition of the record they remove (the raw record's partition).
            producer.produce(rec.topic, rec.value, rec.key, partition=-1 if rec.partition is None else rec.partition,
                             timestamp=rec.timestamp or 0, on_delivery=on_delivery, headers=headers)
        except (KafkaException, BufferError) as exc:
            failures.append(f"{rec.topic}: {exc}")
    left = producer.flush(30)
    if left or failures:
        raise GuardError(
            f"the deletion confirmation was not written to Kafka ({'; '.join(failures) or f'{left} undelivered'}); "
            "the key is already destroyed and the confirmation is kept in the key store: a running worker "
            "delivers it once (within the transaction timeout + 60 s), or re-run `guard erase` to see its state")
    try:
        sanitizer.keys.store.put_audit_checkpoints(settings.audit_topic, notes)
    except GuardError as exc:
        log.warning("the audit checkpoints of this run are on %s but not in the second store (%s)",
                    settings.audit_topic, exc)
