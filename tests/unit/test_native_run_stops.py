"""Where a native run must stop (`Sanitizer._run_stop`): before the first record bound for a compacted
sanitized topic or carrying a `traceparent` header. The runner calls `run_native` again after each record a
run stops at, with the same batch; the batch is read for these stops once, not once per call."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.pipeline import sanitizer as sanitizer_module
from guard.pipeline.sanitizer import Sanitizer

pytestmark = pytest.mark.skipif(os.environ.get("NATIVE") == "0",
                                reason="NATIVE=0: built without the compiled hot path")

COMPACTED = "br.public.profiles"


class Msg:
    """The part of confluent-kafka's `Message` that `first_traced` reads."""

    def __init__(self, headers: list[tuple[str, bytes]] | None) -> None:
        self._headers = headers

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


def fake_sanitizer() -> Any:
    fake = SimpleNamespace(_stops=None, _fast=None, _is_compacted=lambda topic: topic == "s." + COMPACTED,
                           planner=SimpleNamespace(sanitized_topic=lambda topic: "s." + topic),
                           _key_load=SimpleNamespace(settle=lambda: None))
    fake._find_stops = lambda records, start: Sanitizer._find_stops(fake, records, start)  # type: ignore[arg-type]
    return fake


def expected(records: list[tuple[Any, str, int, int, bytes]], start: int) -> int:
    for j in range(start, len(records)):
        headers = records[j][0].headers() or []
        if records[j][1] == COMPACTED or any(name == "traceparent" for name, _ in headers):
            return j
    return len(records)


record = st.tuples(
    st.sampled_from([None, [], [("__debezium.context.taskId", b"0")], [("traceparent", b"00-ab-cd-01")],
                     [("x", b"1"), ("traceparent", b"00-ab-cd-01")]]),
    st.sampled_from(["br.public.customers", "br.public.accounts", COMPACTED]))


@settings(max_examples=200, deadline=None)
@given(st.lists(record, max_size=40), st.lists(st.integers(0, 45), max_size=12))
def test_every_start_gets_the_first_stop_at_or_after_it(shape: list[tuple[Any, str]], starts: list[int]) -> None:
    records = [(Msg(h), topic, 0, n, b"{}") for n, (h, topic) in enumerate(shape)]
    fake = fake_sanitizer()
    # As the runner calls it (each call from after the record the last run stopped at), then any order.
    i = 0
    while i < len(records):
        stop = Sanitizer._run_stop(fake, records, i)
        assert stop == expected(records, i)
        i = stop + 1
    for start in starts:
        start = min(start, len(records))
        assert Sanitizer._run_stop(fake, records, start) == expected(records, start)


def test_a_batch_is_read_once_however_many_runs_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    real = sanitizer_module.first_traced

    def counting(records: list[Any], start: int, stop: int) -> int:
        found = real(records, start, stop)
        read.append(min(found + 1, stop) - start)  # records whose headers this call read
        return found

    monkeypatch.setattr(sanitizer_module, "first_traced", counting)
    traced = {10, 400, 1500}
    records = [(Msg([("traceparent", b"t")] if n in traced else None), "br.public.customers", 0, n, b"{}")
               for n in range(2000)]
    fake = fake_sanitizer()
    runs, i = 0, 0
    while i < len(records):
        stop = Sanitizer._run_stop(fake, records, i)
        runs += 1
        i = stop + 1 if stop < len(records) else stop
    assert runs == 4
    assert sum(read) == len(records)  # each record's headers read once (before: 1,990 + 1,589 + 499 more)


def test_a_new_batch_is_read_again_and_forget_batch_drops_the_records() -> None:
    fake = fake_sanitizer()
    first = [(Msg(None), "br.public.customers", 0, n, b"{}") for n in range(5)]
    second = [(Msg(None), COMPACTED if n == 2 else "br.public.customers", 0, n, b"{}") for n in range(5)]
    assert Sanitizer._run_stop(fake, first, 0) == 5
    assert Sanitizer._run_stop(fake, second, 0) == 2  # another list: not the first batch's memo
    Sanitizer.forget_batch(fake)
    assert fake._stops is None
