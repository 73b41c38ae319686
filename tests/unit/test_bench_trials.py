"""How `guard bench` turns its alternating throughput trials into one figure per mode (pure logic)."""

from types import SimpleNamespace

import pytest

from guard.bench.common import WARMUP_S, BenchError
from guard.bench.drain import ThroughputResult
from guard.bench.topics import Names
from guard.bench.trials import BenchOptions, median_trial, run, trial_group


def result(rate: float) -> ThroughputResult:
    return ThroughputResult(events=1000, seconds=1000 / rate, events_per_s=rate)


def test_the_median_trial_is_a_measured_one_and_ignores_one_outlier() -> None:
    trials = [result(90_000), result(39_000), result(101_000)]
    assert median_trial(trials).events_per_s == 90_000
    assert median_trial([result(20_000), result(31_000), result(24_000)]).events_per_s == 24_000


def test_an_even_count_takes_the_lower_middle_trial() -> None:
    assert median_trial([result(30_000), result(10_000), result(20_000), result(40_000)]).events_per_s == 20_000
    assert median_trial([result(5.0)]).events_per_s == 5.0


def test_full_runs_warm_up_and_smoke_runs_do_not_unless_asked() -> None:
    assert BenchOptions(records=200_000).warmup_s() == WARMUP_S > 0
    assert BenchOptions(records=20_000).warmup_s() == 0
    assert BenchOptions(records=20_000, warmup_seconds=3).warmup_s() == 3
    assert BenchOptions(records=200_000, warmup_seconds=0).warmup_s() == 0


def test_warm_up_rounds_are_named_apart_from_the_trials() -> None:
    ctx = SimpleNamespace(names=Names("abcd1234"))
    groups = {trial_group(ctx, mode, trial) for mode in ("plain", "guard") for trial in (0, 1, 2, "w1", "w2")}
    assert len(groups) == 10
    assert trial_group(ctx, "guard", "w1")[1] == "w1"
    assert trial_group(ctx, "guard", 2)[1] == "t2"


def test_a_negative_warm_up_is_refused_before_anything_runs() -> None:
    with pytest.raises(BenchError, match="--warmup-seconds"):
        run(None, BenchOptions(warmup_seconds=-1))  # type: ignore[arg-type]  # refused before settings are read
