"""The latency trace (`guard.bench.trace`): spans recorded around a worker's methods, and their attribution."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest

from guard.bench.trace import WorkerTrace, attribute, read_spans, render_attribution


def test_attribution_names_the_span_the_slowest_events_waited_through() -> None:
    # 1,000 events 10 ms apart with 20 ms latency, except the 30 sent during a 300-ms key load, which wait
    # until it ends; a commit every 100 ms lasts 5 ms and touches slow and fast events alike.
    sent = [float(i * 10) for i in range(1000)]
    latency = [20.0] * 1000
    for i in range(500, 530):
        latency[i] = 5000 + 300 - sent[i] + 10
    spans = [[float(t), 5.0, "commit", 100] for t in range(0, 10_000, 100)]
    spans.append([5000.0, 300.0, "keys_load", 1800])
    spans.sort(key=lambda s: s[0])
    found = attribute(sent, latency, spans)
    assert found["events"] == 1000
    assert found["slow_events"] >= 10
    assert found["threshold_ms"] > 20
    kinds = found["kinds"]
    assert next(iter(kinds)) == "keys_load"  # ordered by the slow events' overlap
    assert kinds["keys_load"]["slow_share"] == 1.0
    # The 30 sent during it, and the one sent 10 ms before it, whose 20 ms overlap its start.
    assert kinds["keys_load"]["all_share"] == pytest.approx(0.031, abs=0.0005)
    assert kinds["keys_load"]["slow_mean_ms"] > 100 > kinds["keys_load"]["all_mean_ms"]
    assert found["longest_spans"][0]["kind"] == "keys_load"
    assert found["longest_spans"][0]["slow_events"] == found["slow_events"]
    lines = render_attribution("guard", found)
    assert lines[1].split()[0] == "keys_load"


def test_attribution_of_no_events_says_so() -> None:
    assert attribute([], [], []) == {"events": 0}
    assert render_attribution("guard", {"events": 0}) == ["latency trace (guard): no events"]


class _Owner:
    def __init__(self) -> None:
        self.calls = 0

    def work(self, items: list[int]) -> int:
        self.calls += 1
        time.sleep(0.01)
        return sum(items)


def test_worker_trace_records_wrapped_calls_and_collections(tmp_path: Path) -> None:
    path = tmp_path / "w.trace.jsonl"
    trace = WorkerTrace(path, flush_s=0.05)
    owner = _Owner()
    trace.wrap(owner, "work", "batch", count=len)
    trace.wrap(owner, "work", "never", keep=lambda _o, took: took > 10)  # outer wrapper: filtered out
    gc.callbacks.append(trace._on_gc)
    try:
        start = time.time() * 1000
        assert owner.work([1, 2, 3]) == 6  # the wrapper returns what the method returns
        gc.collect()
    finally:
        trace.close()
    assert owner.calls == 1
    spans = read_spans([path, tmp_path / "missing"], start - 1, time.time() * 1000 + 1)
    batch = [s for s in spans if s[2] == "batch"]
    assert len(batch) == 1 and batch[0][3] == 3 and batch[0][1] >= 10
    assert not [s for s in spans if s[2] == "never"]
    assert any(s[2] == "gc2" for s in spans)
    # A half-written last line (a killed worker) is skipped, not fatal.
    with path.open("ab") as f:
        f.write(b"[1.0, 2")
    assert len(read_spans([path], start - 1, time.time() * 1000 + 1)) == len(spans)
