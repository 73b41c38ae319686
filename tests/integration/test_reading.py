"""guard.kafka.reading.read_to_end on the real broker: the end it promises, transaction markers, a start time."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from guard.kafka.reading import READER_SETTINGS, TopicMissingError, read_to_end
from tests.integration.kafka_helpers import kafka_conf

pytestmark = pytest.mark.integration


def _reader(bootstrap: str) -> Consumer:
    return Consumer({**kafka_conf(bootstrap), "group.id": f"guard-read-test-{uuid.uuid4().hex[:6]}", **READER_SETTINGS})


def test_reads_to_the_end_it_had_past_markers_and_from_a_time(stack: dict[str, str]) -> None:
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    topic = f"guard-read-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_conf(bootstrap))  # kept: a collected client cancels its pending requests
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    try:
        _check_reads(bootstrap, topic)
    finally:
        admin.delete_topics([topic])


def _check_reads(bootstrap: str, topic: str) -> None:
    producer = Producer({**kafka_conf(bootstrap), "transactional.id": f"guard-read-test-{uuid.uuid4().hex[:6]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(30):  # ends in commit markers: the last offsets of each partition are never delivered
        producer.produce(topic, f"early-{i}".encode(), partition=i % 3)
    producer.commit_transaction(30)
    time.sleep(0.05)
    middle_ms = int(time.time() * 1000)
    time.sleep(0.05)
    producer.begin_transaction()
    for i in range(6):
        producer.produce(topic, f"late-{i}".encode(), partition=i % 3)
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted", partition=0)
    producer.abort_transaction(30)

    reader = _reader(bootstrap)
    try:
        values = sorted((m.value() or b"").decode() for m in read_to_end(reader, topic, stall_s=60))
    finally:
        reader.close()
    assert values == sorted([f"early-{i}" for i in range(30)] + [f"late-{i}" for i in range(6)])

    reader = _reader(bootstrap)
    try:
        got = []
        for m in read_to_end(reader, topic, since_ms=middle_ms, stall_s=60):
            got.append((m.value() or b"").decode())
            if len(got) == 1:  # appended while reading: after the end the call promised, so not returned
                producer.begin_transaction()
                producer.produce(topic, b"appended", partition=0)
                producer.commit_transaction(30)
    finally:
        reader.close()
    assert sorted(got) == sorted(f"late-{i}" for i in range(6))

    reader = _reader(bootstrap)
    try:
        with pytest.raises(TopicMissingError):
            list(read_to_end(reader, f"guard-no-such-topic-{uuid.uuid4().hex[:8]}"))
    finally:
        reader.close()
