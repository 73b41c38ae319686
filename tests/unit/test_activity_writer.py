"""A transaction's activity is written ahead in chunks and all of it before the commit (`ActivityWriter`)."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from guard.errors import KeyUnavailableError
from guard.kafka.activity import ACTIVITY_CHUNK, ActivityWriter


class _Store:
    def __init__(self, fail_call: int | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.threads: list[str] = []
        self.fail_call = fail_call

    def record_subject_activity(self, branch: str, activity: dict) -> None:
        self.calls.append((branch, dict(activity)))
        self.threads.append(threading.current_thread().name)
        if self.fail_call == len(self.calls):
            raise KeyUnavailableError("key store unreachable (simulated)")


class _Sanitizer:
    """`Sanitizer`'s activity side: pairs of the open batch, those recorded within the hour."""

    def __init__(self) -> None:
        self.subject_activity: dict[tuple[str, str], int | None] = {}
        self.recorded: set[tuple[str, str]] = set()

    def pending_activity(self) -> dict[tuple[str, str], int | None]:
        return {pair: None for pair in self.subject_activity if pair not in self.recorded}

    def mark_recorded(self, pairs) -> None:
        self.recorded.update(pairs)

    def add(self, start: int, count: int, topic: str = "sanitized.br0101.public.customers") -> None:
        for n in range(start, start + count):
            self.subject_activity[(f"s{n:05d}", topic)] = None


@pytest.fixture()
def pool():
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bg-activity") as executor:
        yield executor


def test_pairs_are_written_ahead_in_chunks_and_the_rest_at_the_commit(pool) -> None:
    store, san = _Store(), _Sanitizer()
    writer = ActivityWriter(store, "0101", pool)  # type: ignore[arg-type]
    san.add(0, ACTIVITY_CHUNK - 1)
    writer.maybe_write(san)  # type: ignore[arg-type]
    assert store.calls == []  # not a chunk yet
    san.add(ACTIVITY_CHUNK - 1, 2)
    writer.maybe_write(san)  # type: ignore[arg-type]
    san.add(ACTIVITY_CHUNK + 1, 300)
    writer.maybe_write(san)  # type: ignore[arg-type]  # 300 new since the chunk: not another one
    assert san.recorded == set()  # nothing counts as recorded before the commit
    writer.flush(san)  # type: ignore[arg-type]
    assert [len(a) for _, a in store.calls] == [ACTIVITY_CHUNK + 1, 300]
    assert store.threads[0].startswith("bg-activity") and not store.threads[1].startswith("bg-activity")
    written = [pair for _, a in store.calls for pair in a]
    assert len(written) == len(set(written)) == len(san.subject_activity)  # every pair once
    assert san.recorded == set(san.subject_activity)


def test_a_failed_chunk_fails_the_commit_and_nothing_counts_as_recorded(pool) -> None:
    store, san = _Store(fail_call=1), _Sanitizer()
    writer = ActivityWriter(store, "0101", pool)  # type: ignore[arg-type]
    san.add(0, ACTIVITY_CHUNK)
    writer.maybe_write(san)  # type: ignore[arg-type]
    san.add(ACTIVITY_CHUNK, 10)
    with pytest.raises(KeyUnavailableError):
        writer.flush(san)  # type: ignore[arg-type]
    assert san.recorded == set()
    writer.reset()  # the runner aborts; the replay's transaction writes every pair again
    writer.flush(san)  # type: ignore[arg-type]
    assert len(store.calls[-1][1]) == ACTIVITY_CHUNK + 10 and san.recorded == set(san.subject_activity)


def test_an_aborted_transaction_notes_nothing_and_its_replay_writes_the_pairs_again(pool) -> None:
    store, san = _Store(), _Sanitizer()
    writer = ActivityWriter(store, "0101", pool)  # type: ignore[arg-type]
    san.add(0, ACTIVITY_CHUNK)
    writer.maybe_write(san)  # type: ignore[arg-type]
    writer.reset()  # abort: the chunk may have been written; it is not noted
    assert san.recorded == set()
    writer.flush(san)  # type: ignore[arg-type]
    assert len(store.calls) == 2 and store.calls[0][1] == store.calls[1][1]


def test_pairs_recorded_within_the_hour_are_not_written_again(pool) -> None:
    store, san = _Store(), _Sanitizer()
    writer = ActivityWriter(store, "0101", pool)  # type: ignore[arg-type]
    san.add(0, 20)
    writer.flush(san)  # type: ignore[arg-type]
    san.add(10, 20)  # 10 known, 10 new
    writer.flush(san)  # type: ignore[arg-type]
    assert [len(a) for _, a in store.calls] == [20, 10]
