"""Where the watches' alerts go: a readable partition of the anomalies topic, never a hanging one (pure logic,
the producer recorded)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from guard.kafka.partitioning import java_string_hash
from guard.kafka.side_alerts import SideAlerts, critical_alert


class RecordingProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes, bytes, int]] = []
        self.flushes = 0

    def produce(self, topic: str, value: bytes, key: bytes, *, partition: int) -> None:
        self.sent.append((topic, value, key, partition))

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return 0


def alerts(partitions: int) -> tuple[SideAlerts, list[RecordingProducer]]:
    made: list[RecordingProducer] = []

    def new_producer(config: dict[str, Any]) -> Any:
        made.append(RecordingProducer(config))
        return made[-1]

    side = SideAlerts({"enable.idempotence": True}, "guard.anomalies", partitions_of=lambda _: partitions,
                      new_producer=new_producer)
    return side, made


def test_no_producer_until_the_first_alert_then_one_for_all():
    side, made = alerts(3)
    assert made == []
    assert side.send(b"k1", b"v1") and side.send(b"k2", b"v2")
    assert len(made) == 1 and made[0].config == {"enable.idempotence": True}
    assert [s[:3] for s in made[0].sent] == [("guard.anomalies", b"v1", b"k1"), ("guard.anomalies", b"v2", b"k2")]
    assert made[0].flushes == 2  # each alert is acknowledged before the watch goes on


def test_the_same_key_lands_on_the_same_partition_and_never_on_a_hanging_one():
    side, made = alerts(3)
    key = b"partitions_not_fetching:g:m:t[0]"
    side.send(key, b"a")
    assert made[0].sent[-1][3] == java_string_hash(key.decode()) % 3
    for hanging in ({0}, {1}, {2}, {0, 1}, {1, 2}, {0, 2}):
        side.hanging(hanging)
        for i in range(20):
            side.send(f"key-{i}".encode(), b"x")
            assert made[0].sent[-1][3] not in hanging
    side.hanging(set())
    side.send(key, b"b")
    assert made[0].sent[-1][3] == java_string_hash(key.decode()) % 3


def test_with_every_partition_hanging_nothing_is_sent():
    side, made = alerts(2)
    side.hanging({0, 1})
    assert side.send(b"k", b"v") is False
    assert made == []


def test_a_critical_alert_has_the_guards_anomaly_shape_and_an_id_from_its_scope():
    ns = uuid.UUID("00000000-0000-0000-0000-000000000001")
    key, value = critical_alert("some_rule", "some_rule:scope", ns, branch="br0101", worker="w1", now=1.5, extra=3)
    alert = orjson.loads(value)
    assert key == b"some_rule:scope"
    assert alert == {"type": "anomaly", "id": str(uuid.uuid5(ns, "some_rule:scope")), "rule": "some_rule",
                     "severity": "critical", "branch": "br0101", "table": None, "column": None, "at_ms": 1500,
                     "worker": "w1", "extra": 3}
