"""The open batch's activity sent before its commit (`guard.pipeline.activity.EarlyActivity`): each send's
reply is read at the commit, in order, a failed write stops the commit, and a batch given up drops what it
sent. The store here records calls (pure logic); tests/integration/test_native_path.py writes real activity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from guard.errors import KeyUnavailableError
from guard.pipeline.activity import EarlyActivity, RecentPairs
from guard.pipeline.sanitizer import Sanitizer


class Reply:
    def __init__(self, log: list[str], n: int, fails: bool) -> None:
        self.log, self.n, self.fails = log, n, fails

    def result(self) -> int:
        self.log.append(f"read {self.n}")
        if self.fails:
            raise KeyUnavailableError("key store unreachable (ConnectionError)")
        return 0

    def drop(self) -> None:
        self.log.append(f"drop {self.n}")


class Store:
    def __init__(self, failing: set[int] = frozenset()) -> None:
        self.log: list[str] = []
        self.failing = failing

    def send_subject_activity(self, branch: str, activity: dict) -> Reply:
        n = sum(1 for entry in self.log if entry.startswith("send"))
        assert all(v is None for v in activity.values()), "activity never moves an expiry"
        self.log.append(f"send {n} {branch} {sorted(activity)}")
        return Reply(self.log, n, n in self.failing)


def test_sends_are_read_in_order_at_the_commit_and_say_which_pairs_are_written():
    store = Store()
    early = EarlyActivity(store, "b1")  # type: ignore[arg-type]
    early.send([("s1", "t1"), ("s2", "t1")])
    early.send([])
    early.send([("s3", "t2")])
    assert store.log == ["send 0 b1 [('s1', 't1'), ('s2', 't1')]", "send 1 b1 [('s3', 't2')]"]
    assert early.sent == {("s1", "t1"), ("s2", "t1"), ("s3", "t2")}
    assert early.written() == [("s1", "t1"), ("s2", "t1"), ("s3", "t2")]
    assert store.log[2:] == ["read 0", "read 1"]
    assert early.written() == [], "a reply is read once"
    early.drop()
    assert early.sent == set() and store.log[4:] == []


def test_a_failed_write_stops_the_commit_and_a_batch_given_up_drops_what_is_unread():
    store = Store(failing={1})
    early = EarlyActivity(store, "b1")  # type: ignore[arg-type]
    early.send([("s1", "t1")])
    early.send([("s2", "t1")])
    early.send([("s3", "t1")])
    with pytest.raises(KeyUnavailableError):
        early.written()
    assert store.log[3:] == ["read 0", "read 1"]
    early.drop()  # the runner aborts the batch
    assert store.log[5:] == ["drop 1", "drop 2"] and early.sent == set()


class Sent:
    def __init__(self) -> None:
        self.sent: set = set()
        self.calls: list[list] = []

    def send(self, pairs: list) -> None:
        self.calls.append(pairs)
        self.sent.update(pairs)


def fake_sanitizer(recorded: RecentPairs | None = None) -> SimpleNamespace:
    return SimpleNamespace(subject_activity={}, _activity_seen=0,
                           _activity_recorded=recorded or RecentPairs(lambda: 0.0, 3600), _early_activity=Sent())


def test_each_send_looks_at_the_pairs_added_since_the_last_and_skips_recorded_ones():
    now = [0.0]
    recorded = RecentPairs(lambda: now[0], 3600)
    recorded.add([("stale", "t")])
    now[0] = 2000.0
    recorded.add([("old", "t")])
    now[0] = 3700.0  # "old" written 1,700 s ago, "stale" 3,700 s ago
    san = fake_sanitizer(recorded)
    for pair in [("a", "t"), ("old", "t"), ("stale", "t")]:
        san.subject_activity[pair] = 30
    Sanitizer.send_activity(san)  # type: ignore[arg-type]
    assert sorted(san._early_activity.calls[0]) == [("a", "t"), ("stale", "t")], "recorded lately: not again"
    san.subject_activity[("a", "t")] = 30  # seen again: not a new entry
    san.subject_activity[("b", "t")] = 30
    Sanitizer.send_activity(san)  # type: ignore[arg-type]
    assert san._early_activity.calls[1:] == [[("b", "t")]]
    Sanitizer.send_activity(san)  # type: ignore[arg-type]
    assert san._early_activity.calls[2:] == [[]]


def test_after_a_pop_the_next_send_looks_at_every_pair_and_sends_only_the_unsent():
    san = fake_sanitizer()
    for pair in [("a", "t"), ("b", "t"), ("c", "t")]:
        san.subject_activity[pair] = 30
    Sanitizer.send_activity(san)  # type: ignore[arg-type]
    san.subject_activity[("d", "t")] = 30
    san.subject_activity.pop(("a", "t"))  # an erased subject's pair: entries move
    san._activity_seen = 0  # what the sanitizer's pops do
    Sanitizer.send_activity(san)  # type: ignore[arg-type]
    assert san._early_activity.calls[1:] == [[("d", "t")]], "the pair after the pop is not missed"


def test_a_pair_is_recorded_for_between_half_the_span_and_the_span_and_an_erased_one_is_forgotten():
    for at in (0.0, 10.0, 49.0, 50.0, 99.0, 170.0):
        for step in (50.0, 7.0):  # no call until half a span later, or one every 7 s
            now = [0.0]
            recent = RecentPairs(lambda: now[0], 100)  # noqa: B023 - called within this iteration only
            now[0] = at
            recent.add([("s", "t")])
            while now[0] < at + 50:
                now[0] = min(now[0] + step, at + 50)
                assert recent.unrecorded([("s", "t")]) == set(), "recorded for at least half the span"
            while now[0] < at + 100:
                now[0] = min(now[0] + step, at + 100)
                recent.unrecorded([])

            assert recent.unrecorded([("s", "t")]) == {("s", "t")}, "a span later it is written again"
    recent = RecentPairs(lambda: now[0], 100)
    recent.add([("gone", "t"), ("kept", "t")])
    recent.discard(("gone", "t"))
    assert recent.unrecorded([("gone", "t"), ("kept", "t")]) == {("gone", "t")}
    now[0] += 10_000  # idle for long: both generations forgotten at once
    assert recent.unrecorded([("kept", "t")]) == {("kept", "t")} and len(recent) == 0


def test_recent_pairs_stay_bounded():
    recent = RecentPairs(lambda: 0.0, 3600)
    recent.add((str(i), "t") for i in range(RecentPairs.MAX_PAIRS + 1))
    recent.add([("next", "t")])
    assert len(recent) == 1, "past the bound the generation is forgotten (its pairs are written again)"
