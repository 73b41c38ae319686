"""The throughput targets are checked only on warmed-up trials (`guard.bench.report.target_checks`)."""

from __future__ import annotations

from typing import Any

import pytest

from guard.bench.report import target_checks

STEADY = "guard throughput >= 30% of plain (exactly-once both), steady state"
FIRST = "guard throughput >= 30% of plain (exactly-once both), first sight"


def _report(ratio: float, first: float, warmup: dict[str, Any] | None) -> dict[str, Any]:
    return {"ratio": ratio, "ratio_first_sight": first, "machine": {"cores": 2}, "workload": {"kind": "realistic"},
            "warmup": warmup,
            "modes": {"guard": {"events_per_s": 38_000.0, "latency": {"p99_ms": 100.0, "rate_achieved": 19_000.0}}}}


WARMED = {"seconds": 21.0, "plain_events_per_s": [181_000.0], "guard_events_per_s": [37_000.0]}


@pytest.mark.parametrize(("ratio", "first", "steady_status", "first_status"), [
    (0.301, 0.237, "pass", "fail"),
    (0.202, 0.183, "fail", "fail"),
])
def test_warmed_up_trials_pass_or_fail_on_the_ratio(ratio: float, first: float, steady_status: str,
                                                    first_status: str) -> None:
    checks = {c["target"]: c for c in target_checks(_report(ratio, first, WARMED))}
    assert (checks[STEADY]["status"], checks[FIRST]["status"]) == (steady_status, first_status)
    assert "warm-up" not in checks[STEADY]["note"]


@pytest.mark.parametrize(("ratio", "first"), [(0.301, 0.237), (0.202, 0.183)])
def test_a_ratio_of_trials_without_a_warm_up_is_neither_a_pass_nor_a_fail(ratio: float, first: float) -> None:
    """`--warmup-seconds 0 --trials 1` measured a cold plain loop at half its rate and "passed" at 0.301."""
    checks = {c["target"]: c for c in target_checks(_report(ratio, first, None))}
    for name, value in ((STEADY, ratio), (FIRST, first)):
        assert checks[name]["status"] == "n/a"
        assert checks[name]["value"] == value  # the figure is still reported
        assert "--warmup-seconds 0" in checks[name]["note"] and "ran cold" in checks[name]["note"]
