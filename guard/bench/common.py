"""What every part of the benchmark shares: its logger, its error, the targets it checks, its durations and
its percentile."""

from __future__ import annotations

import datetime as dt
import logging

from guard.errors import GuardError

log = logging.getLogger("guard.bench")

#: 13 digits, so every event's value ends in `"ts_ms":<13 digits>}` and the send time can be spliced in.
TS_SENTINEL = 9_999_999_999_999
TS_TAIL = len(b"9999999999999}")
EPOCH_DAY = dt.date(1970, 1, 1)

TARGET_RATIO = 0.30
TARGET_P99_MS = 250.0
#: What the guard may add, at p99, to Debezium's own commit-to-topic latency (`--db-latency`).
TARGET_ADDED_P99_MS = 100.0
TARGET_RSS_DRIFT_PCT = 10.0
TARGET_SCALING = 1.6
SOAK_TARGET_S = 600
#: The guard workers' data-key cache TTL on the realistic workload (the guard's default is 60 s): short
#: enough that keys, and the value caches emptied with them, expire several times inside every measured
#: window (a 200,000-event window lasts 30-60 s on the 2-core machine), as they do in hours of real traffic.
BENCH_KEY_CACHE_TTL_S = 10.0
#: Below this many records a run is a smoke run (tests): shorter latency phases, no warm-up before the trials.
SMOKE_BELOW_RECORDS = 50_000
#: A broker younger than this when the bench starts gets a note in the report if the run had no warm-up
#: (docs/benchmark.md, round 7).
FRESH_BROKER_S = 180
#: Default untimed warm-up before the trials (`warm_up`): a fresh broker's rates settled after ~60 s of
#: intermittent load (docs/benchmark.md, round 8), and the fill and the trials are load too.
WARMUP_S = 45.0
#: Paced seconds before each latency phase's measured window. The phase starts right after a drain of the
#: whole input; in 2 of 12 first runs the guard then needed ~2 s to settle into the paced rhythm (a
#: backlog of full 2,000-record batches at 25-46 us per event, a 130-ms offsets send), and with a 1-s
#: warm-up that transient alone decided the p99 (390 and 299 ms; docs/benchmark.md, round 8).
LATENCY_WARMUP_S = 5.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation, so p99 is a latency that happened."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(int(round(q / 100 * len(ordered) + 0.5)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


class BenchError(GuardError):
    """The benchmark could not run or a phase did not finish; the message says which and why."""
