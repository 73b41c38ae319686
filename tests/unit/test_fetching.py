"""The watch of assigned partitions that never fetch: its clock, the statistics it reads, its alert (pure logic)."""

from __future__ import annotations

import orjson
import pytest

from guard.kafka.fetching import NotFetchingWatch, alert_record, fetch_states

A = ("branch.public.customers", 0)
B = ("branch.public.customers", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch(limit_s: float = 60.0) -> tuple[NotFetchingWatch, Clock]:
    clock = Clock()
    return NotFetchingWatch(limit_s, clock), clock


def test_a_partition_held_and_never_fetched_is_reported_once_after_the_limit():
    w, clock = watch()
    for t in range(0, 61, 5):
        clock.now = t
        assert w.observe([A, B], {A: "none", B: "active"}) is None
    clock.now = 61
    finding = w.observe([A, B], {A: "none", B: "active"})
    assert finding is not None
    assert finding.states == ((A, "none"),) and finding.for_s == 61
    assert finding.partitions == ["branch.public.customers[0]"]
    for t in range(62, 300, 5):  # still stuck: the same stall is not reported again
        clock.now = t
        assert w.observe([A, B], {A: "none", B: "active"}) is None
    assert w.overdue() == {"branch.public.customers[0]": pytest.approx(297)}


def test_a_partition_that_fetches_now_and_then_is_never_reported():
    w, clock = watch()
    for t in range(0, 600, 5):
        clock.now = t
        state = "active" if t % 50 == 0 else "offset-query"  # a rewind, a leader change: short waits
        assert w.observe([A], {A: state}) is None


def test_a_second_partition_stalling_later_is_reported_with_the_first_still_listed():
    w, clock = watch(limit_s=10)
    clock.now = 11
    assert w.observe([A, B], {A: "none", B: "active"}) is None  # A's clock starts at its first sight
    clock.now = 22
    first = w.observe([A, B], {A: "none", B: "active"})
    assert first is not None and first.partitions == ["branch.public.customers[0]"]
    clock.now = 30
    assert w.observe([A, B], {A: "none", B: "stopped"}) is None
    clock.now = 41
    second = w.observe([A, B], {A: "none", B: "stopped"})
    assert second is not None
    assert second.states == ((A, "none"), (B, "stopped")) and second.for_s == 30


def test_a_reported_partition_that_fetches_again_is_resolved_and_may_be_reported_anew():
    w, clock = watch(limit_s=10)
    w.observe([A], {A: "none"})
    clock.now = 11
    assert w.observe([A], {A: "none"}) is not None
    clock.now = 15
    assert w.observe([A], {A: "active"}) is None
    assert w.take_resolved() == [(A, 15)] and w.take_resolved() == []
    assert w.overdue() == {}
    clock.now = 16
    w.observe([A], {A: "stopped"})
    clock.now = 27
    assert w.observe([A], {A: "stopped"}) is not None


def test_a_partition_leaving_the_assignment_starts_over():
    w, clock = watch(limit_s=10)
    w.observe([A], {A: "none"})
    clock.now = 9
    assert w.observe([], {A: "none"}) is None  # revoked: its clock is dropped
    clock.now = 12
    assert w.observe([A], {A: "none"}) is None  # given back at 12: a full limit again
    clock.now = 23
    assert w.observe([A], {A: "none"}) is not None


def test_without_statistics_nothing_is_timed_and_a_partition_missing_from_them_is_not_fetching():
    w, clock = watch(limit_s=10)
    for t in (0, 20, 40):
        clock.now = t
        assert w.observe([A], None) is None
    w.observe([A], {})
    clock.now = 51
    finding = w.observe([A], {})
    assert finding is not None and finding.states == ((A, "unknown"),)


def test_a_new_consumer_starts_every_clock_and_report_over():
    w, clock = watch(limit_s=10)
    w.observe([A], {A: "none"})
    clock.now = 11
    assert w.observe([A], {A: "none"}) is not None
    w.restart()
    assert w.overdue() == {}
    assert w.observe([A], {A: "none"}) is None
    clock.now = 22
    assert w.observe([A], {A: "none"}) is not None


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError):
        NotFetchingWatch(0)


def test_fetch_states_are_read_from_librdkafkas_statistics():
    stats = {"topics": {
        "branch.public.customers": {"partitions": {
            "0": {"fetch_state": "active", "consumer_lag": 3},
            "1": {"fetch_state": "none"},
            "-1": {"fetch_state": "none"},  # librdkafka's internal UA partition
        }},
        "branch.public.accounts": {"partitions": {"0": {"fetch_state": "stopped"}, "1": {}}},
    }}
    assert fetch_states(stats) == {A: "active", B: "none", ("branch.public.accounts", 0): "stopped"}
    assert fetch_states({}) == {}


def test_the_alert_names_the_partitions_the_offsets_partition_and_what_to_do():
    w, clock = watch(limit_s=10)
    w.observe([A, B], {A: "none", B: "none"})
    clock.now = 95
    finding = w.observe([A, B], {A: "none", B: "none"})
    assert finding is not None
    key, value = alert_record(finding, group="branchguard-sanitizer", offsets_partition="__consumer_offsets[7]",
                              member_id="m-1", branch="br0101", worker="w1", now=1_700_000_000.0)
    alert = orjson.loads(value)
    assert (alert["rule"], alert["severity"], alert["type"]) == ("partitions_not_fetching", "critical", "anomaly")
    assert alert["partitions"] == ["branch.public.customers[0]", "branch.public.customers[1]"]
    assert alert["fetch_states"] == {"branch.public.customers[0]": "none", "branch.public.customers[1]": "none"}
    assert alert["not_fetching_for_s"] == 95 and alert["offsets_partition"] == "__consumer_offsets[7]"
    assert "__consumer_offsets[7]" in alert["suggested_action"]
    assert alert["at_ms"] == 1_700_000_000_000 and alert["worker"] == "w1" and alert["branch"] == "br0101"
    # the same consumer's same stall keeps its id; another consumer's gets another
    again_key, again = alert_record(finding, group="branchguard-sanitizer", offsets_partition="__consumer_offsets[7]",
                                    member_id="m-1", branch="br0101", worker="w1", now=1_700_000_050.0)
    assert orjson.loads(again)["id"] == alert["id"] and again_key == key
    _, other = alert_record(finding, group="branchguard-sanitizer", offsets_partition="__consumer_offsets[7]",
                            member_id="m-2", branch="br0101", worker="w1", now=1_700_000_050.0)
    assert orjson.loads(other)["id"] != alert["id"]
