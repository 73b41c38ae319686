"""The phases and trials of a run: throughput drains, warm-ups, latency, soak and scaling; `run`."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from guard.bench.common import (
    BENCH_KEY_CACHE_TTL_S,
    LATENCY_WARMUP_S,
    SMOKE_BELOW_RECORDS,
    WARMUP_S,
    BenchError,
    log,
)
from guard.bench.drain import ThroughputResult, catch_up, drain_fresh
from guard.bench.gate import start_for_drain
from guard.bench.latency import broker_uptime_s, local_broker, measure_latency
from guard.bench.report import machine_facts, target_checks
from guard.bench.stackcpu import StackCpuSampler, local_stack_processes
from guard.bench.topics import (
    Names,
    cleanup_kafka,
    cleanup_redis,
    create_topic,
    drift_alert_keys,
    fill,
    missing_keys,
    pace,
    write_alerts,
)
from guard.bench.workers import BenchContext, RssSampler, WorkerSet
from guard.bench.workload import MESSAGE_TOPIC, WORKLOADS, Workload, build_workload
from guard.config import Settings
from guard.kafka_security import client_config
from guard.protect.fastpath import use_native


# --- phases ----------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    seconds: float
    rate: float
    warmup_s: float
    window_s: float
    first_mib: float
    last_mib: float
    drift_pct: float
    samples: list[tuple[float, float]]


def soak(ctx: BenchContext, workload: Workload, workers: int, rate: float, seconds: float,
         guard_group: tuple[str, str]) -> SoakResult:
    """Steady `rate` through restarted guard workers for `seconds`; RSS (sum over workers) every 5 s.

    `guard_group` is (group, branch suffix) of the guard workers that ran the latency phase, so the
    restarted workers resume where they stopped, with the keys they created.
    """
    sampler = RssSampler(5.0)
    soak_ctx = dataclasses.replace(ctx, sampler=sampler)
    group = WorkerSet(soak_ctx, "guard", workers, guard_group[0], "soak", guard_group[1]).start()
    try:
        catch_up(soak_ctx, group)
        t0 = time.time()
        pace(client_config(ctx.settings), ctx.names, workload, rate, seconds, group.check_alive)
    finally:
        group.stop()
        sampler.close()
    per_t: dict[float, float] = {}
    for t, _, _, rss in sampler.samples:
        per_t[round(t - t0, 1)] = per_t.get(round(t - t0, 1), 0.0) + rss / 2**20
    series = sorted((t, mib) for t, mib in per_t.items() if 0 <= t <= seconds)
    warmup = 60.0 if seconds >= 180 else seconds / 3
    window = min(60.0, (seconds - warmup) / 2)
    first = [m for t, m in series if warmup <= t < warmup + window]
    last = [m for t, m in series if seconds - window <= t <= seconds]
    first_mib = statistics.fmean(first) if first else float("nan")
    last_mib = statistics.fmean(last) if last else float("nan")
    drift = (last_mib - first_mib) / first_mib * 100 if first_mib > 0 else float("nan")
    return SoakResult(seconds, rate, warmup, window, first_mib, last_mib, drift, series)


def scaling(ctx: BenchContext) -> dict[str, Any]:
    """Guard throughput with 1 then 2 workers, each a fresh group draining the workload written again once
    the group is formed (`gate.start_for_drain`: the same records for both, and no join inside the window)."""
    results: dict[str, Any] = {}
    for count in (1, 2):
        workers = WorkerSet(ctx, "guard", count, ctx.names.group(f"scale{count}"), f"scale{count}")
        try:
            result = drain_fresh(ctx, workers, start_for_drain(ctx, workers, written_again=True))
        finally:
            result_workers = workers.stop()
        result.workers = result_workers
        results[f"workers_{count}"] = asdict(result)
        log.info("scaling: %d worker(s) %.0f events/s", count, result.events_per_s)
    one, two = results["workers_1"]["events_per_s"], results["workers_2"]["events_per_s"]
    results["speedup"] = two / one if one else float("nan")
    return results


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    records: int = 200_000
    partitions: int = 2
    workers: int = 1
    trials: int = 3
    latency_seconds: float | None = None
    warmup_seconds: float | None = None
    scaling: bool = False
    soak_seconds: float = 0.0
    keep: bool = False
    #: `realistic` (a branch day over every table, a million customers) or `hot` (customers only, 4,000).
    workload: str = "realistic"
    #: The workload's customer population; None: the workload's default.
    customers: int | None = None
    #: The guard workers' data-key cache TTL; None: `BENCH_KEY_CACHE_TTL_S` for the realistic workload
    #: (so keys expire inside every measured window), the guard's default for `hot`.
    key_cache_ttl: float | None = None
    #: Population sizes of the memory-and-key-state phase (`guard.bench.scale`); empty: not run.
    memory_scale: list[int] = field(default_factory=list)
    #: Measured seconds of the latency-from-the-database phase (`guard.bench.dblatency`); 0: not run.
    db_latency_seconds: float = 0.0
    #: Rows/s written into the branch database in that phase; None: half the guard's measured max rate.
    db_rate: float | None = None
    json_out: Path | None = None
    #: `--latency-trace FILE`: guard workers trace their activity; each latency phase's (send time, latency)
    #: pairs, the worker's spans and their attribution (`guard.bench.trace`) are written to FILE as JSON.
    latency_trace: Path | None = None
    #: Events/s of the latency phases and the soak; None: half the guard's measured steady-state rate. A fixed
    #: rate lets two builds be compared at the same load on a machine whose speed varies between runs.
    latency_rate: float | None = None

    @property
    def smoke(self) -> bool:
        """A short run (tests): fewer than `SMOKE_BELOW_RECORDS` records."""
        return self.records < SMOKE_BELOW_RECORDS

    def cache_ttl(self) -> float | None:
        if self.key_cache_ttl is not None:
            return self.key_cache_ttl
        return BENCH_KEY_CACHE_TTL_S if self.workload == "realistic" else None

    def latency_s(self) -> float:
        """Measured seconds of a latency phase: 20 by default, 5 for smoke runs so tests stay short."""
        if self.latency_seconds is not None:
            return self.latency_seconds
        return 5.0 if self.smoke else 20.0

    def latency_warmup_s(self) -> float:
        """Paced seconds before a latency phase's measured window: `LATENCY_WARMUP_S`, 1 s for smoke runs."""
        return 1.0 if self.smoke else LATENCY_WARMUP_S

    def warmup_s(self) -> float:
        """`WARMUP_S` by default; smoke runs skip the warm-up so tests stay short."""
        if self.warmup_seconds is not None:
            return self.warmup_seconds
        return 0.0 if self.smoke else WARMUP_S


def decision_cost() -> dict[str, Any]:
    """The cost of one write decision, measured in this process (`guard.bench.policy_cost`)."""
    from guard.bench.policy_cost import measure

    return measure()


def trial_group(ctx: BenchContext, mode: str, trial: int | str) -> tuple[str, str]:
    """(consumer group, guard branch suffix) of a mode's trial; the first trial keeps the plain names.

    A warm-up round is named by a string (`w1`, `w2`, ...) so its groups and keys never meet a trial's.
    """
    if trial == 0:
        return ctx.names.group(mode), ""
    tag = trial if isinstance(trial, str) else f"t{trial}"
    return ctx.names.group(f"{mode}-{tag}"), tag


def run_mode_throughput(ctx: BenchContext, mode: str, workers: int, trial: int | str = 0,
                        phase: str = "") -> tuple[WorkerSet, ThroughputResult]:
    """Start W workers of `mode` in the trial's group and drain the input; the workers keep running.

    `phase` "steady" runs a guard in a group of its own on the branch of the trial's first-sight guard:
    its keys exist in the key store, none is in the new worker's cache.
    """
    group_id, suffix = trial_group(ctx, mode, trial)
    if phase:
        group_id = f"{group_id}-{phase}"
    # Warm-up workers are sampled under their own label: their RSS is not the mode's measured peak.
    label = (mode if not phase else f"{mode}-{phase}") if isinstance(trial, int) else f"warmup-{mode}"
    group = WorkerSet(ctx, mode, workers, group_id, label, suffix)
    try:
        result = drain_fresh(ctx, group, start_for_drain(ctx, group))
    except BaseException:
        group.stop()
        raise
    name = f"trial {trial + 1}" if isinstance(trial, int) else f"warm-up {trial}"
    keys = result.keys
    log.info("%s%s %s: %d events in %.2fs = %.0f events/s%s (per second: %s)", mode, f" {phase}" if phase else "",
             name, result.events, result.seconds, result.events_per_s,
             f"; key cache hits {keys['cache_hit_rate']}, {keys['round_trips_per_event']} key-store round trips "
             f"({keys['data_key_round_trips_per_event']} for data keys) and {keys['keys_created_per_event']} new keys "
             f"per event; memo hits {keys.get('memo_hit_rate')}" if keys else "",
             " ".join(map(str, result.per_second)))
    return group, result


@dataclass
class WarmUp:
    """The untimed rounds before the trials: how long they ran and each round's rate (for the reader)."""

    seconds: float
    plain_events_per_s: list[float]
    guard_events_per_s: list[float]


def warm_up(ctx: BenchContext, workers: int, seconds: float) -> WarmUp | None:
    """Untimed rounds (a plain then a guard drain of the input) until `seconds` have passed, at least one.

    The bench is meant to measure the two loops, not a JVM's warm-up. A broker just started by `guard
    stack up` serves its first minute or so of load slower while its JIT compiles the hot paths: right
    after a start, plain drains of 100k records measured 70k, 88k, then 168-192k events/s in runs 20 s
    apart (docs/benchmark.md, round 8), and the first bench after a start failed the p99 target in 4 of
    8 runs against 1 of 22 later runs (round 7). Both modes warm up alike, and the rounds are reported.
    """
    if seconds <= 0:
        return None
    start = time.monotonic()
    rates: dict[str, list[float]] = {"plain": [], "guard": []}
    rounds = 0
    while rounds == 0 or time.monotonic() - start < seconds:
        rounds += 1
        for mode in ("plain", "guard"):
            group, result = run_mode_throughput(ctx, mode, workers, f"w{rounds}")
            group.stop()
            rates[mode].append(round(result.events_per_s, 1))
    return WarmUp(round(time.monotonic() - start, 1), rates["plain"], rates["guard"])


def median_trial(results: list[ThroughputResult]) -> ThroughputResult:
    """The trial with the median rate (the lower middle one of an even count): a rate that was measured."""
    ordered = sorted(results, key=lambda r: r.events_per_s)
    return ordered[(len(ordered) - 1) // 2]


def execute(ctx: BenchContext, workload: Workload, opts: BenchOptions) -> dict[str, Any]:
    """The phases: warm-up, throughput trials, guard latency, plain latency, scaling, soak.

    A trial is a plain drain, a first-sight guard drain (a new branch: every data key is created), a
    steady-state drain of the guard with policy checks off (`guard-nopolicy`) and one with them on (the
    `guard` mode; each a new worker on that branch: every key exists, none is cached). The last
    trial's steady-state workers stay up for the latency phase, and the plain latency phase resumes the
    last plain trial's group.
    """
    warmup = warm_up(ctx, opts.workers, opts.warmup_s())
    trials: dict[str, list[ThroughputResult]] = {"plain": [], "guard_first_sight": [], "guard-nopolicy": [],
                                                  "guard": []}
    guard: WorkerSet | None = None
    try:
        for trial in range(opts.trials):
            plain, result = run_mode_throughput(ctx, "plain", opts.workers, trial)
            result.workers = plain.stop()
            trials["plain"].append(result)
            first, result = run_mode_throughput(ctx, "guard", opts.workers, trial)
            result.workers = first.stop()
            trials["guard_first_sight"].append(result)
            # The guard with policy checks off, in the same state (keys exist, none cached): what checking
            # every write costs, against the steady-state drain that follows.
            off, result = run_mode_throughput(ctx, "guard-nopolicy", opts.workers, trial, "steady")
            result.workers = off.stop()
            trials["guard-nopolicy"].append(result)
            guard, result = run_mode_throughput(ctx, "guard", opts.workers, trial, "steady")
            trials["guard"].append(result)
            if trial < opts.trials - 1:
                result.workers = guard.stop()
                guard = None
    except BaseException:
        if guard is not None:
            guard.stop()
        raise
    assert guard is not None
    plain_tp, guard_tp = median_trial(trials["plain"]), median_trial(trials["guard"])
    first_tp = median_trial(trials["guard_first_sight"])
    off_tp = median_trial(trials["guard-nopolicy"])
    rate = opts.latency_rate if opts.latency_rate is not None else guard_tp.events_per_s / 2
    try:
        log.info("guard: latency at %.0f events/s for %.0fs", rate, opts.latency_s())
        guard_lat = measure_latency(ctx, guard, workload, rate, opts.latency_s(), opts.latency_warmup_s())
        write_trace(opts, ctx)  # at once: a run stopped later still leaves the guard phase's trace
    finally:
        trials["guard"][-1].workers = guard.stop()
    plain_group, _ = trial_group(ctx, "plain", opts.trials - 1)
    plain = WorkerSet(ctx, "plain", opts.workers, plain_group, "plain").start()
    try:
        catch_up(ctx, plain)
        log.info("plain: latency at %.0f events/s for %.0fs", rate, opts.latency_s())
        plain_lat = measure_latency(ctx, plain, workload, rate, opts.latency_s(), opts.latency_warmup_s())
    finally:
        plain.stop()
    plain_us = 1e6 / plain_tp.events_per_s
    report: dict[str, Any] = {
        "modes": {
            "plain": {**asdict(plain_tp), "latency": asdict(plain_lat), "peak_rss_mib": ctx.sampler.peak_mib("plain"),
                      "us_per_event": round(plain_us, 2)},
            "guard": {**asdict(guard_tp), "latency": asdict(guard_lat),
                      "peak_rss_mib": ctx.sampler.peak_mib("guard-steady"),
                      "us_per_event": round(1e6 / guard_tp.events_per_s, 2)},
            "guard_first_sight": {**asdict(first_tp), "peak_rss_mib": ctx.sampler.peak_mib("guard"),
                                  "us_per_event": round(1e6 / first_tp.events_per_s, 2)},
        },
        "ratio": guard_tp.events_per_s / plain_tp.events_per_s,
        "ratio_first_sight": first_tp.events_per_s / plain_tp.events_per_s,
        "latency_rate": rate,
        "latency_rate_fixed": opts.latency_rate is not None,
        "warmup": asdict(warmup) if warmup is not None else None,
        "trials": {
            "plain_events_per_s": [round(r.events_per_s, 1) for r in trials["plain"]],
            "guard_events_per_s": [round(r.events_per_s, 1) for r in trials["guard"]],
            "guard_first_sight_events_per_s": [round(r.events_per_s, 1) for r in trials["guard_first_sight"]],
            "ratios": [round(g.events_per_s / p.events_per_s, 3)
                       for p, g in zip(trials["plain"], trials["guard"], strict=True)],
            "ratios_first_sight": [round(g.events_per_s / p.events_per_s, 3)
                                   for p, g in zip(trials["plain"], trials["guard_first_sight"], strict=True)],
            "cpu_us_per_event": {mode: [r.cpu_us_per_event for r in results] for mode, results in trials.items()},
        },
        # Policy checks on (the `guard` mode) against off (`guard-nopolicy`), same records, same run.
        "policy": {
            "guard_nopolicy_events_per_s": round(off_tp.events_per_s, 1),
            "ratio_policy_off": off_tp.events_per_s / plain_tp.events_per_s,
            "on_vs_off": guard_tp.events_per_s / off_tp.events_per_s,
            "trials_nopolicy_events_per_s": [round(r.events_per_s, 1) for r in trials["guard-nopolicy"]],
            "peak_rss_mib_nopolicy": ctx.sampler.peak_mib("guard-nopolicy-steady"),
            # Times a guard held a partition at a delete whose attribution message it had not read yet.
            "attribution_waits": sum(int(w.get("attribution_waits", 0)) for mode in ("guard_first_sight", "guard")
                                     for r in trials[mode] for w in r.workers),
            "decision_cost": decision_cost(),
        },
    }
    for mode in ("plain", "guard", "guard_first_sight"):
        report["modes"][mode]["events_per_s"] = round(report["modes"][mode]["events_per_s"], 1)
    if opts.scaling:
        report["scaling"] = scaling(ctx)
    if opts.soak_seconds > 0:
        log.info("soak: %.0fs at %.0f events/s", opts.soak_seconds, rate)
        group, suffix = trial_group(ctx, "guard", opts.trials - 1)
        report["soak"] = asdict(soak(ctx, workload, opts.workers, rate, opts.soak_seconds, (f"{group}-steady", suffix)))
    return report


def run(settings: Settings, opts: BenchOptions) -> dict[str, Any]:
    """Set up topics, fill, run every phase, clean up; returns the JSON report."""
    if opts.scaling and opts.partitions < 2:
        raise BenchError("--scaling needs at least 2 partitions")
    if opts.records < 1 or opts.workers < 1 or opts.partitions < 1 or opts.trials < 1:
        raise BenchError("--records, --workers, --partitions and --trials must be positive")
    if not opts.warmup_s() >= 0:  # written so that NaN is refused too
        raise BenchError("--warmup-seconds must be 0 (no warm-up) or more")
    if opts.workload not in WORKLOADS:
        raise BenchError(f"--workload must be one of {', '.join(WORKLOADS)}")
    admin = AdminClient(client_config(settings))
    try:
        admin.list_topics(timeout=10)
    except KafkaException:
        raise BenchError(f"Kafka at {settings.kafka_bootstrap} does not answer: run `guard stack up`") from None
    names = Names(uuid.uuid4().hex[:8])
    machine = machine_facts()
    broker = local_broker(settings.kafka_bootstrap)
    machine["broker_uptime_s_at_start"] = broker_uptime_s(broker)
    # The workers inherit this environment, so they resolve GUARD_HOT_PATH the same way.
    machine["guard_hot_path"] = "native" if use_native(settings.hot_path) else "python"
    started = time.monotonic()
    workload = build_workload(opts.records, customers=opts.customers, kind=opts.workload)
    log.info("built the %s workload: %d events of %d distinct customers (population %d) in %.1fs", opts.workload,
             len(workload.order), workload.facts["distinct_customers"], workload.customers, time.monotonic() - started)
    alert_keys = missing_keys(settings.redis_url, drift_alert_keys(workload, settings.tenant))
    sampler = RssSampler(0.5)
    stack_processes = local_stack_processes(settings.kafka_bootstrap, settings.redis_url)
    stack_cpu = StackCpuSampler(stack_processes) if stack_processes else None
    ctx = BenchContext(settings, names, opts.partitions, sampler, Path(tempfile.mkdtemp(prefix=f"{names.prefix}-")),
                       broker_gc_log=broker.gc_log if broker is not None and broker.gc_log.is_file() else None,
                       stack_cpu=stack_cpu,
                       tables=workload.tables, key_cache_ttl=opts.cache_ttl(), messages=workload.has_messages,
                       trace={} if opts.latency_trace is not None else None, workload=workload)
    try:
        for table in workload.tables:
            create_topic(admin, names.input(table), opts.partitions)
            # Both modes' output topics exist before the timed windows: a guard creates a table's sanitized
            # topic once in its life (`TopicManager.ensure_like`), which is not per-event work.
            create_topic(admin, names.sanitized(table), opts.partitions)
        if workload.has_messages:
            # Where Debezium publishes the logical decoding messages that attribute deletes (policy on).
            create_topic(admin, names.input(MESSAGE_TOPIC), opts.partitions)
        create_topic(admin, names.plain_out, opts.partitions)
        fill_rate = fill(client_config(settings), names, workload)
        log.info("filled %s with %d events (%.0f/s); worker logs in %s", ", ".join(ctx.inputs), opts.records,
                 fill_rate, ctx.log_dir)
        report = execute(ctx, workload, opts)
        # Every write the workload names its principal for: a write decided `unattributed` or denied by
        # any guard of the run is a fault of the bench's records (or of the guard), not a figure.
        report["policy"]["write_alerts"] = write_alerts(client_config(settings), names)
        ctx.groups.add(names.group("alerts"))
    finally:
        sampler.close()
        if stack_cpu is not None:
            stack_cpu.close()
        if not opts.keep:
            try:
                cleanup_kafka(admin, names, ctx.groups)
            except KafkaException as exc:
                log.warning("could not delete the bench topics of %s: %s", names.prefix, exc)
            cleanup_redis(settings.redis_url, names, alert_keys)
    report.update({
        "runid": names.runid,
        "records": opts.records,
        "partitions": opts.partitions,
        "workers": opts.workers,
        "trials_per_mode": opts.trials,
        "workload": {"kind": workload.kind, "records": opts.records, "customers": workload.customers,
                     "updates": workload.updates, "mean_value_bytes": round(workload.mean_value_bytes(), 1),
                     "fill_events_per_s": round(fill_rate), "topics": ctx.inputs,
                     "key_cache_ttl_s": opts.cache_ttl(), **workload.facts},
        "machine": machine,
        "kept_topics": opts.keep,
    })
    if opts.db_latency_seconds > 0:
        from guard.bench.dblatency import measure_db_latency

        db_rate = opts.db_rate if opts.db_rate is not None else report["latency_rate"]
        log.info("latency from the database: %.0f rows/s for %.0fs", db_rate, opts.db_latency_seconds)
        report["db_latency"] = asdict(measure_db_latency(settings, db_rate, opts.db_latency_seconds,
                                                         log_path=str(ctx.log_dir / "guard-db-latency.log"),
                                                         trace=ctx.trace))
    if opts.memory_scale:
        from guard.bench.scale import measure_scale

        report["memory_scale"] = measure_scale(settings, opts.memory_scale, partitions=opts.partitions)
    report["targets"] = target_checks(report)
    if write_trace(opts, ctx):
        report["latency_trace"] = str(opts.latency_trace)
    return report


def write_trace(opts: BenchOptions, ctx: BenchContext) -> bool:
    """`--latency-trace`: write the phases traced so far to the file (again after each phase)."""
    if opts.latency_trace is None or ctx.trace is None:
        return False
    opts.latency_trace.write_bytes(orjson.dumps({"runid": ctx.names.runid, "phases": ctx.trace}))
    return True
