"""The database-latency target is checked only at the rate it names (`guard.bench.report.target_checks`)."""

from __future__ import annotations

from typing import Any

import pytest

from guard.bench.report import target_checks

NAME = "guard adds < 100 ms p99 to Debezium's commit-to-topic latency at 50% of its max rate"


def _report(achieved: float, added_p99_ms: float) -> dict[str, Any]:
    return {"ratio": 0.2, "ratio_first_sight": 0.2, "machine": {"cores": 2}, "workload": {"kind": "realistic"},
            "modes": {"guard": {"events_per_s": 38_000.0,
                                "latency": {"p99_ms": 100.0, "rate_achieved": 19_000.0}}},
            # `--db-rate` asked for the rate written: the target's rate is still half the guard's
            "db_latency": {"rate_target": achieved, "rate_achieved": achieved, "added_p99_ms": added_p99_ms,
                           "raw_p99_ms": 105.0}}


def _db_check(report: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in target_checks(report) if c["target"] == NAME)


@pytest.mark.parametrize(("achieved", "added", "status"), [
    (18_900.0, 84.0, "pass"),   # at the named rate and under the bound
    (18_900.0, 120.0, "fail"),
    (1_900.0, 84.0, "n/a"),     # under the bound, but at a tenth of the rate: no pass (round 26)
    (5_000.0, 79.1, "n/a"),     # `--db-rate 5000` reached: still not the rate the target names
    (1_900.0, 120.0, "fail"),   # over the bound even on a lighter load
])
def test_a_p99_under_the_bound_passes_only_at_the_rate_the_target_names(achieved: float, added: float,
                                                                        status: str) -> None:
    found = _db_check(_report(achieved, added))
    assert found["status"] == status
    assert found["value"] == added
    assert "Debezium alone p99 105.0 ms" in found["note"]
    if achieved < 0.9 * 19_000:
        assert f"written at {achieved:.0f} rows/s, under the target's rate (half the guard's, 19000)" in found["note"]
