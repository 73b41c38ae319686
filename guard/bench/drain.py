"""A throughput window: a fresh group drains what the input holds, timed by the workers' own clocks.

Both the trials (`guard.bench.trials`) and the memory-and-key-state phase (`guard.bench.scale`) time their
drains here, so neither imports the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from guard.bench.common import BenchError
from guard.bench.gate import DrainInput
from guard.bench.workers import BenchContext, GroupProgress, WorkerSet


@dataclass
class ThroughputResult:
    events: int
    seconds: float
    events_per_s: float
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Events committed in each second of the window: tells a slow start (new keys) from a steady rate.
    per_second: list[int] = field(default_factory=list)
    #: Guard: the key manager's counters over the window (`KeyManager.counters`) and what they make per
    #: event (`key_figures`); empty for the plain loop.
    keys: dict[str, Any] = field(default_factory=dict)
    #: The workers' CPU time per event over the window (µs; all threads of the worker processes, so
    #: librdkafka's compression and I/O too): what an event costs on a core, less sensitive than the rate to
    #: the other processes sharing the machine. None if a worker did not report it.
    cpu_us_per_event: float | None = None
    #: µs per event over the same window of each local stack process (broker, controller, connect, key
    #: store) and of the whole machine (`machine`, all processes), and the machine's busy share
    #: (`machine_busy_share`, of all cores); empty when the bench runs against another stack
    #: (`guard.bench.stackcpu`).
    stack_cpu_us_per_event: dict[str, float] = field(default_factory=dict)


def key_figures(counts: dict[str, int], events: int) -> dict[str, Any]:
    """Per-event key figures of a guard window: cache hit rate, key-store round trips, keys fetched/created.

    The data-key cache's hit rate is the share of per-event key lookups whose key did not come from the
    key store in the window: 1 - keys fetched / lookups. (`key_hits` alone would count a key the batch's
    prefetch loaded a moment before as a hit.) Compare `keys_fetched` with the workload's distinct customers.
    Round trips are every request to the key store (commits' activity writes, policy attributions, erasure
    bookkeeping) and, apart, those that loaded or created data keys: what the cache misses cost.
    The memo hit rate is the share of the compiled path's memo lookups (data-subject tokens, sanitized Kafka
    keys, and the masks and blind indexes it asks Python for) that its memos answered (`native/src/memo.rs`).
    """
    if not counts:
        return {}
    lookups = counts.get("key_lookups", 0)
    memo_lookups, memo_hits = counts.get("memo_lookups", 0), counts.get("memo_hits", 0)
    per = max(events, 1)
    return {**counts,
            "cache_hit_rate": round(max(0.0, 1 - counts.get("keys_fetched", 0) / lookups), 4) if lookups else None,
            "memo_hit_rate": round(memo_hits / memo_lookups, 4) if memo_lookups else None,
            "round_trips_per_event": round(counts.get("store_round_trips", 0) / per, 4),
            "data_key_round_trips_per_event": round(counts.get("data_key_round_trips", 0) / per, 4),
            "keys_fetched_per_event": round(counts.get("keys_fetched", 0) / per, 4),
            "keys_created_per_event": round(counts.get("keys_created", 0) / per, 4)}


def drain_fresh(ctx: BenchContext, workers: WorkerSet, given: DrainInput | None = None) -> ThroughputResult:
    """Let a fresh group consume the whole input topic (or what `given` names: `gate.start_for_drain`);
    time it with the workers' own timestamps."""
    progress = GroupProgress.of(ctx, workers)
    try:
        if given is None:
            if ctx.markers:  # the count below is of offsets, and a commit marker takes one without a record
                raise BenchError("a drain of every record in the input can't follow a transactional write of it "
                                 "(guard.bench.gate); drain the workload written again instead")
            targets = progress.ends()
            count = sum(targets.values())
        else:
            targets, count = given.targets, given.records
        observed = progress.wait(targets, workers, timeout=120 + count / 500)
    finally:
        progress.close()
    # The group's offsets can be seen committed a moment before the worker's "commit" line is read.
    deadline = time.monotonic() + 10
    while (window := workers.window(count)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if window is None:
        raise BenchError(f"{workers.mode} workers reported no progress")
    start, end = window
    if end > observed + 1:  # a worker's clock can't be ahead of the parent's observation of the same commit
        end = observed
    seconds = max(end - start, 1e-6)
    keys = key_figures(workers.key_counters(end), count) if workers.mode != "plain" else {}
    cpu = workers.cpu_seconds(end)
    stack = ctx.stack_cpu.window(start, end) if ctx.stack_cpu is not None else None
    return ThroughputResult(count, seconds, count / seconds, per_second=workers.per_second(start, end), keys=keys,
                            cpu_us_per_event=None if cpu is None else round(cpu / count * 1e6, 2),
                            stack_cpu_us_per_event={} if stack is None else stack.per_event(count))


def catch_up(ctx: BenchContext, workers: WorkerSet) -> None:
    """Wait until a (re)started group has committed everything currently in the input topic."""
    progress = GroupProgress.of(ctx, workers)
    try:
        targets = progress.ends()
        progress.wait(targets, workers, timeout=120 + sum(targets.values()) / 500)
    finally:
        progress.close()
