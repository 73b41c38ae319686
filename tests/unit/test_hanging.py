"""The hanging-transaction clock, the offsets-partition arithmetic and the alert (pure logic)."""

from __future__ import annotations

import orjson
import pytest

import guard.doctor.transactions as doctor
from guard.config import Settings
from guard.kafka.hanging import (
    Hanging,
    PartitionEnds,
    StuckTracker,
    alert_record,
)
from guard.kafka.partitioning import group_offsets_partition, java_string_hash

A = ("guard.audit", 1)
B = ("sanitized.br0101.public.customers", 0)


def test_a_partition_whose_lso_stands_still_behind_the_hw_is_reported_after_the_limit():
    t = StuckTracker(limit_s=60)
    assert t.observe(0, {A: PartitionEnds(1511, 976)}) == []
    assert t.observe(59, {A: PartitionEnds(1530, 976)}) == []  # writes keep arriving behind it
    [h] = t.observe(61, {A: PartitionEnds(1540, 976)})
    assert (h.topic, h.partition, h.last_stable, h.high_watermark) == ("guard.audit", 1, 976, 1540)
    assert h.stuck_s == 61


def test_a_busy_partition_whose_lso_moves_is_never_reported():
    t = StuckTracker(limit_s=60)
    for i in range(0, 600, 5):
        # always unstable when sampled (a transaction is open), but each time at a later LSO
        assert t.observe(i, {B: PartitionEnds(100 + i + 3, 100 + i)}) == []


def test_a_partition_that_reaches_its_hw_starts_over():
    t = StuckTracker(limit_s=60)
    t.observe(0, {A: PartitionEnds(10, 5)})
    t.observe(30, {A: PartitionEnds(10, 10)})  # resolved
    assert t.pending() == {}
    assert t.observe(80, {A: PartitionEnds(12, 10)}) == []  # unstable again, clock restarts at 80
    assert len(t.observe(141, {A: PartitionEnds(12, 10)})) == 1


def test_java_string_hash_matches_java():
    # Values of String.hashCode() as the JVM computes them.
    assert java_string_hash("") == 0
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("polygenelubricants") == -(2**31)  # the famous Integer.MIN_VALUE hash
    assert java_string_hash("网点") == 31 * 0x7F51 + 0x70B9


def test_group_offsets_partition_is_kafkas_partition_for():
    assert group_offsets_partition("anything", 1) == 0
    assert group_offsets_partition("hello", 50) == 99162322 % 50
    assert group_offsets_partition("polygenelubricants", 50) == 0  # Utils.abs(MIN_VALUE) is 0
    assert 0 <= group_offsets_partition("branchguard-sanitizer", 50) < 50


def test_the_alert_names_partition_and_remedy_and_keeps_its_id_across_restarts():
    h = Hanging("guard.audit", 1, 976, 1511, 125.0)
    key, value = alert_record(h, branch="0101", worker="w1", now=1.0)
    again_key, again_value = alert_record(h, branch="0101", worker="w2", now=99.0)
    alert, again = orjson.loads(value), orjson.loads(again_value)
    assert key == again_key and alert["id"] == again["id"]
    assert alert["rule"] == "hanging_transaction" and alert["severity"] == "critical"
    assert (alert["topic"], alert["partition"], alert["last_stable_offset"]) == ("guard.audit", 1, 976)
    assert "--start-offset 976" in alert["suggested_action"]
    other = orjson.loads(alert_record(Hanging("guard.audit", 1, 977, 1511, 1), branch="0101", worker="w1",
                                      now=1.0)[1])
    assert other["id"] != alert["id"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.mark.parametrize(("moves", "ok"), [(True, True), (False, False)])
def test_doctor_waits_for_unstable_partitions_and_fails_only_on_a_stuck_one(monkeypatch, moves, ok):
    clock = _Clock()
    lso = {"v": 10}

    def ends(_admin, partitions, timeout_s=10.0):
        if moves:
            lso["v"] += 1
        return {tp: PartitionEnds(50, lso["v"]) for tp in partitions}

    monkeypatch.setattr(doctor, "output_partitions", lambda _a, _s: [A])
    monkeypatch.setattr(doctor, "read_ends", ends)
    checks = doctor.check_hanging_transactions(None, Settings(transaction_timeout_ms=30_000),  # type: ignore[arg-type]
                                               clock=clock, sleep=clock.sleep)
    assert [c.ok for c in checks] == [ok]
    if not ok:
        assert "guard.audit[1]" in checks[0].detail and "--start-offset 10" in checks[0].action
        assert clock.now > 60  # it waited past the transaction timeout + margin before calling it hanging
