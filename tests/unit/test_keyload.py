"""A batch's key load in chunks (`guard.pipeline.keyload`): where the chunks are cut, and that every
chunk's request is sent before the worker waits on a reply. The key manager here is a recorder
(pure logic); tests/integration/test_native_path.py runs the chunks against the real key store."""

from __future__ import annotations

from typing import Any

import pytest

from guard.pipeline.keyload import CHUNK_GROWTH, FIRST_CHUNK_RECORDS, ChunkedKeyLoad, plan_chunks


def test_chunks_grow_from_the_first_miss_and_leave_out_ranges_without_a_subject():
    first = 10
    a, b = first + FIRST_CHUNK_RECORDS, first + FIRST_CHUNK_RECORDS * (1 + CHUNK_GROWTH)
    tokens = ["s0", "s1", "s2", "s3", "s4"]
    at = [first, first + 5, a, b + 7, b + 9]
    assert plan_chunks(first, tokens, at, ["decoded"]) == [
        (first, ["decoded", "s0", "s1"]), (a, ["s2"]), (b, ["s3", "s4"])]
    # nothing in the second range: the third chunk still starts where its range does
    assert plan_chunks(first, ["s0", "s3"], [first, b], []) == [(first, ["s0"]), (b, ["s3"])]
    assert plan_chunks(0, [], [], []) == []
    assert plan_chunks(0, [], [], ["decoded"]) == [(0, ["decoded"])]
    with pytest.raises(ValueError):
        plan_chunks(0, ["s0"], [], [])


class Recorder:
    """The key manager's side of a chunked load, as a log of what was sent, read and dropped."""

    def __init__(self, cached: set[str] = frozenset()) -> None:
        self.log: list[tuple[str, Any]] = []
        self.cached = cached

    def send_prefetch(self, branch: str, subjects: list[str]) -> Any:
        if all(s in self.cached for s in subjects):
            return None
        self.log.append(("send", subjects[0]))
        return subjects[0]

    def finish_prefetch(self, fetch: Any) -> None:
        self.log.append(("read", fetch))

    def drop_prefetch(self, fetch: Any) -> None:
        self.log.append(("drop", fetch))


def chunks() -> list[tuple[int, list[str]]]:
    return [(0, ["c0"]), (128, ["c1"]), (640, ["c2"]), (2688, ["c3"])]


def test_every_request_is_sent_before_the_first_wait_and_misses_read_up_to_their_chunk():
    keys = Recorder()
    load = ChunkedKeyLoad(keys, "b")  # type: ignore[arg-type]
    load.start(chunks())
    assert keys.log == [("send", "c0"), ("send", "c1"), ("send", "c2"), ("send", "c3"), ("read", "c0")]
    assert load.pending
    keys.log.clear()
    assert not load.reach(100), "a miss before the next chunk in flight reads nothing (its record loads alone)"
    assert keys.log == []
    assert load.reach(128)
    assert keys.log == [("read", "c1")]
    keys.log.clear()
    assert load.reach(3000), "a miss past several chunks reads each, in order"
    assert keys.log == [("read", "c2"), ("read", "c3")]
    assert not load.pending and not load.reach(None)


def test_the_python_path_reads_every_chunk_and_a_batch_given_up_drops_those_in_flight():
    keys = Recorder()
    load = ChunkedKeyLoad(keys, "b")  # type: ignore[arg-type]
    load.start(chunks())
    keys.log.clear()
    assert load.reach(None)
    assert keys.log == [("read", "c1"), ("read", "c2"), ("read", "c3")]
    load.start(chunks())
    keys.log.clear()
    load.drop()
    assert keys.log == [("drop", "c1"), ("drop", "c2"), ("drop", "c3")] and not load.pending


def test_chunks_whose_keys_are_all_cached_send_nothing():
    keys = Recorder(cached={"c0", "c2"})
    load = ChunkedKeyLoad(keys, "b")  # type: ignore[arg-type]
    load.start(chunks())
    assert keys.log == [("send", "c1"), ("send", "c3"), ("read", "c1")], "the first chunk sent is waited for"
    keys.log.clear()
    assert not load.reach(640), "the chunk at 640 sent nothing; the next in flight starts at 2688"
    assert load.reach(2688)
    assert keys.log == [("read", "c3")]


def test_a_batch_done_reads_the_requests_its_runs_never_reached_and_drops_them_if_one_fails():
    keys = Recorder()
    load = ChunkedKeyLoad(keys, "b")  # type: ignore[arg-type]
    load.start(chunks())
    keys.log.clear()
    load.settle()  # a partition held at a delete: the runs never reached the chunks in flight
    assert keys.log == [("read", "c1"), ("read", "c2"), ("read", "c3")] and not load.pending

    class Failing(Recorder):
        def finish_prefetch(self, fetch: Any) -> None:
            raise RuntimeError("key store unreachable")

    keys = Failing()
    load = ChunkedKeyLoad(keys, "b")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        load.start(chunks())
    keys.log.clear()
    load.settle()
    assert keys.log == [("drop", "c1"), ("drop", "c2"), ("drop", "c3")] and not load.pending


def test_a_subject_named_by_several_tables_is_in_the_chunk_of_its_first_record_only():
    """`batch_subjects` reads each table's ids apart: a customer whose account row follows comes twice. One
    key-creation request must never offer a subject two keys (the second would replace the first)."""
    far = FIRST_CHUNK_RECORDS + 5
    assert plan_chunks(0, ["cust", "acct", "cust", "cust"], [0, 1, 2, far], ["acct", "dec"]) == [
        (0, ["acct", "dec", "cust"])]
    assert plan_chunks(0, ["a", "b", "a"], [0, far, far + 1]) == [(0, ["a"]), (FIRST_CHUNK_RECORDS, ["b"])]
