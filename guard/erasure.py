"""Erasure on request: `guard erase` crypto-shreds one data subject and publishes the confirmation."""

from __future__ import annotations

from typing import Any

import orjson
from confluent_kafka import Producer

from guard.config import Settings
from guard.runtime import build_sanitizer

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
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for rec in records:
        producer.produce(rec.topic, rec.value, rec.key)
    if producer.flush(30):
        raise RuntimeError("the deletion confirmation could not be written to Kafka within 30 s; the key is "
                           "already destroyed: re-run `guard erase` to re-issue the confirmation")
    confirmation: dict[str, Any] = orjson.loads(records[0].value or b"{}")
    return confirmation
