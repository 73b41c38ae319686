"""The bench's CPU per event: the workers report their process CPU time at the first record and at every
commit; the window's CPU is the last commit's (at or before the window's end) less the first's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from guard.bench.report import render_cpu
from guard.bench.workers import WorkerProc, WorkerSet


def _proc(lines: list[dict[str, Any]]) -> WorkerProc:
    stdout = [orjson.dumps(line).decode() + "\n" for line in lines]
    proc = WorkerProc("guard", "w", SimpleNamespace(stdout=stdout), Path("/nonexistent"))  # type: ignore[arg-type]
    proc.read()
    return proc


def _set(*procs: WorkerProc) -> WorkerSet:
    workers = WorkerSet(SimpleNamespace(groups=set()), "guard", len(procs), "g", "l")  # type: ignore[arg-type]
    workers.procs = list(procs)
    return workers


def test_the_window_cpu_is_each_workers_last_commit_before_the_end_less_its_first_record() -> None:
    a = _proc([{"ev": "first", "t": 10.0, "cpu": 1.5},
               {"ev": "commit", "t": 11.0, "events": 100, "cpu": 2.0},
               {"ev": "commit", "t": 12.0, "events": 200, "cpu": 2.7},
               {"ev": "commit", "t": 13.0, "events": 300, "cpu": 9.9}])  # after the window: not counted
    b = _proc([{"ev": "first", "t": 10.5, "cpu": 0.25},
               {"ev": "commit", "t": 11.5, "events": 50, "cpu": 1.0}])
    assert _set(a, b).cpu_seconds(12.0) == pytest.approx(1.2 + 0.75)


def test_a_worker_that_reported_no_cpu_makes_the_figure_unknown_not_smaller() -> None:
    measured = _proc([{"ev": "first", "t": 1.0, "cpu": 1.0}, {"ev": "commit", "t": 2.0, "events": 5, "cpu": 2.0}])
    silent = _proc([{"ev": "first", "t": 1.0}, {"ev": "commit", "t": 2.0, "events": 5}])
    assert _set(measured).cpu_seconds(5.0) == 1.0
    assert _set(measured, silent).cpu_seconds(5.0) is None
    assert _set(measured).cpu_seconds(1.5) is None  # no commit in the window yet


def test_the_report_line_gives_every_trial_and_the_median_trials_cpu_ratio() -> None:
    report = {"trials": {"cpu_us_per_event": {"plain": [10.0, 12.0], "guard": [40.0, 50.0]}},
              "modes": {"plain": {"cpu_us_per_event": 10.0}, "guard": {"cpu_us_per_event": 40.0}}}
    line = render_cpu(report)
    assert line is not None
    assert "plain 10.0, 12.0; guard 40.0, 50.0" in line
    assert line.endswith("plain/guard CPU per event 0.250 (median trials)")
    report["trials"]["cpu_us_per_event"]["guard"] = [40.0, None]
    assert render_cpu(report) is None
