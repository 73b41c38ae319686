"""How `guard bench` turns its alternating throughput trials into one figure per mode (pure logic)."""

from guard.bench import ThroughputResult, median_trial


def result(rate: float) -> ThroughputResult:
    return ThroughputResult(events=1000, seconds=1000 / rate, events_per_s=rate)


def test_the_median_trial_is_a_measured_one_and_ignores_one_outlier() -> None:
    trials = [result(90_000), result(39_000), result(101_000)]
    assert median_trial(trials).events_per_s == 90_000
    assert median_trial([result(20_000), result(31_000), result(24_000)]).events_per_s == 24_000


def test_an_even_count_takes_the_lower_middle_trial() -> None:
    assert median_trial([result(30_000), result(10_000), result(20_000), result(40_000)]).events_per_s == 20_000
    assert median_trial([result(5.0)]).events_per_s == 5.0
