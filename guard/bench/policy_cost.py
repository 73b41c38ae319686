"""What one access-policy decision costs: uncached (a Cedar evaluation), from the engine's cache, from the
write checker's memo, and the native path's per-event scan; measured in one process on the demo policy.

Each figure is the best of `repeat` rounds of `n` decisions (microseconds per decision), so a slow spell
of the shared machine inflates none of them; the raw rounds are kept in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from guard.bench.workload import BENCH_PRINCIPAL, build_workload
from guard.config import load_settings
from guard.pipeline.policy import WriteChecker
from guard.policy.engine import PolicyEngine, Request, default_directory
from guard.policy.sources import staff_entities

TABLE = "public.customers"


def _best(fn: Callable[[], None], n: int, repeat: int) -> tuple[float, list[float]]:
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return min(rounds), [round(r, 2) for r in rounds]


def measure(n: int = 2000, repeat: int = 5) -> dict[str, Any]:
    """Microseconds per decision: `uncached` (one Cedar call each), `uncached_batch` (one Cedar call for
    n requests), `engine_cache`, `checker_memo` (what a steady stream pays), `scan` (native pre-pass)."""
    staff = staff_entities([("t0101-01", "0101", "bank-a", True, ["teller"])])
    settings = load_settings(None, policy_staff="file", branch="0101")
    engine = PolicyEngine(default_directory(), entity_source=lambda: staff)
    checker = WriteChecker(settings, engine, None)
    checker.decide("c", BENCH_PRINCIPAL, TABLE, 1_800_000_000_000)  # the table entity, once
    principal = ("Staff", "t0101-01")
    resource = ("Table", f"0101:{TABLE}")
    base = 1_800_000_000.0

    def uncached_requests() -> list[Request]:
        # a new time bucket per request: every one misses the cache and is evaluated by Cedar
        nonlocal base
        base += n + 1
        return [Request(principal, "write", resource, {"time": base + i, "purpose": "branch_operation",
                                                       "source": "cdc", "volume": 1}) for i in range(n)]

    def uncached() -> None:
        for req in uncached_requests():
            engine.decide(req.principal, req.action, req.resource, req.context)

    def uncached_batch() -> None:
        engine.decide_batch(uncached_requests())

    ctx = {"time": base, "purpose": "branch_operation", "source": "cdc", "volume": 1}
    engine.decide(principal, "write", resource, ctx)

    def engine_cache() -> None:
        for _ in range(n):
            engine.decide(principal, "write", resource, ctx)

    def checker_memo() -> None:
        for _ in range(n):
            checker.decide("c", BENCH_PRINCIPAL, TABLE, 1_800_000_000_000)

    hot = build_workload(200, customers=50, kind="hot")  # customers creates and updates, as before
    values = [v for i in range(n) if (v := hot.value(i % 50, 1_800_000_000_000)) is not None]  # no tombstones

    def scan() -> None:
        for value in values:
            checker.scan(value, TABLE)

    out: dict[str, Any] = {"n": n, "repeat": repeat}
    for name, fn in (("uncached_us", uncached), ("uncached_batch_us", uncached_batch),
                     ("engine_cache_us", engine_cache), ("checker_memo_us", checker_memo), ("scan_us", scan)):
        best, rounds = _best(fn, n, repeat)
        out[name] = round(best, 2)
        out[name.replace("_us", "_rounds")] = rounds
    assert checker.decide("c", BENCH_PRINCIPAL, TABLE, 1_800_000_000_000).allowed
    return out
