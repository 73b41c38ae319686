"""The open batch's activity sent before its commit (`guard.pipeline.activity.EarlyActivity`): each send's
reply is read at the commit, in order, a failed write stops the commit, and a batch given up drops what it
sent. The store here records calls (pure logic); tests/integration/test_native_path.py writes real activity."""

from __future__ import annotations

import pytest

from guard.errors import KeyUnavailableError
from guard.pipeline.activity import EarlyActivity


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
