"""Erasure on request: `guard erase` crypto-shreds one data subject and publishes the confirmation."""

from __future__ import annotations

import time
from typing import Any

import orjson
from confluent_kafka import Producer

from guard.config import Settings
from guard.errors import GuardError
from guard.kafka_security import client_config
from guard.pipeline.runtime import build_sanitizer
from guard.records.builders import OutRecord

REASONS = {
    "art47_1_purpose_achieved": "processing purpose achieved, unachievable or no longer necessary",
    "art47_2_retention_expired": "service ended or retention period expired",
    "art47_3_consent_withdrawn": "the individual withdrew consent",
    "art47_4_unlawful_processing": "processing violated a law, regulation or agreement",
    "art47_5_other_legal": "another case provided by law",
    "subject_request": "the individual requested deletion (PIPL Art. 47, last sentence)",
}


def erase_subject(settings: Settings, subject_id: str, reason_code: str, by: str) -> dict[str, Any]:
    """Shred (or hold) the subject, write confirmation + audit record, wait until Kafka has them."""
    sanitizer = build_sanitizer(settings)
    subject = sanitizer.keys.subject_token(subject_id)
    records = sanitizer.erase(subject, trigger="erase_command", reason_code=reason_code,
                              reason=REASONS[reason_code], by=by)
    _publish(settings, records)
    confirmation: dict[str, Any] = orjson.loads(records[0].value or b"{}")
    return confirmation


def sweep_retention(
    settings: Settings, *, now: float | None = None, by: str = "retention-sweep"
) -> list[dict[str, Any]]:
    """Erase every subject of the branch whose retention ran out (PIPL Art. 19 and 47(2)).

    Expiry is last change + the retention of the tables the subject's data sits in (catalog, per table or
    per class). Run it from cron or a scheduler; it is idempotent and safe to run from several places.
    """
    sanitizer = build_sanitizer(settings)
    now = time.time() if now is None else now
    confirmations: list[dict[str, Any]] = []
    while True:
        expired = sanitizer.keys.store.expired_subjects(settings.branch, now)
        if not expired:
            return confirmations
        for subject in expired:
            records = sanitizer.erase(subject, trigger="retention_expiry", reason_code="art47_2_retention_expired",
                                      reason=REASONS["art47_2_retention_expired"], by=by)
            _publish(settings, records)
            sanitizer.keys.store.forget_expiry(settings.branch, subject)
            confirmations.append(orjson.loads(records[0].value or b"{}"))


def _publish(settings: Settings, records: list[OutRecord]) -> None:
    producer = Producer(client_config(settings, **{"enable.idempotence": True}))
    for rec in records:
        producer.produce(rec.topic, rec.value, rec.key)
    if producer.flush(30):
        raise GuardError("the deletion confirmation could not be written to Kafka within 30 s; the key is "
                         "already destroyed: re-run the command to re-issue the confirmation")
