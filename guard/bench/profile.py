"""The local hot-path profile (`--profile-local`): `Sanitizer.process` over the bench records without Kafka."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guard.bench.topics import Names, cleanup_redis, drift_alert_keys, missing_keys
from guard.bench.workload import Workload, build_workload
from guard.config import Settings


# --- local hot-path profile (no Kafka) ---------------------------------------------------------------
class StageTimer:
    """Exclusive time per stage: a stage's own time, minus time spent in stages it calls.

    Exclusive accounting keeps the stages adding up to the total: e.g. the HMAC inside `subject_token` is
    counted under "blind index / token HMAC", the rest of `subject_token` under "data-subject key lookup".
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # [start, child time]

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, stack, seconds, calls = time.perf_counter, self._stack, self.seconds, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [clock(), 0.0]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                spent = clock() - frame[0]
                seconds[stage] = seconds.get(stage, 0.0) + spent - frame[1]
                calls[stage] = calls.get(stage, 0) + 1
                if stack:
                    stack[-1][1] += spent

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _instrument(sanitizer: Any, timer: StageTimer) -> Callable[[], None]:
    """Wrap the sanitizer's stages in place; returns a function that undoes the class/module patches."""
    import guard.pipeline.decode as decode_module
    import guard.pipeline.protect as protect_module
    import guard.pipeline.sanitizer as sanitizer_module
    from guard.keys.primitives import Aead, BlindIndex

    module_patches = [(decode_module, "decode_value", "decode (JSON envelope)"),
                      (sanitizer_module, "decode_value", "decode (JSON envelope)"),
                      (protect_module, "mask", "display masks")]
    originals = [(module, name, getattr(module, name)) for module, name, _ in module_patches]
    for (module, name, stage), (_, _, original) in zip(module_patches, originals, strict=True):
        setattr(module, name, timer.wrap(stage, original))
    seal, token = Aead.seal, BlindIndex.token
    Aead.seal = timer.wrap("AES-GCM seal (one call per image)", seal)  # type: ignore[method-assign]
    BlindIndex.token = timer.wrap("blind index / token HMAC", token)  # type: ignore[method-assign]
    keys = sanitizer.keys
    sanitizer.classifier.plan = timer.wrap("classify (cached plan)", sanitizer.classifier.plan)
    sanitizer.sanitize_key = timer.wrap("Kafka key (cached)", sanitizer.sanitize_key)
    keys.subject_token = timer.wrap("data-subject key lookup", keys.subject_token)
    keys.subject_aead = timer.wrap("data-subject key lookup", keys.subject_aead)
    sanitizer.sanitized_codec.encode = timer.wrap("Avro encode (sanitized)", sanitizer.sanitized_codec.encode)
    sanitizer.audit_codec.encode = timer.wrap("Avro encode (audit)", sanitizer.audit_codec.encode)
    sanitizer.emitter.audit = timer.wrap("audit record (build)", sanitizer.emitter.audit)
    sanitizer.emitter._alert_once = timer.wrap("alert dedup (memo, else SET NX)", sanitizer.emitter._alert_once)
    sanitizer.protector.image = timer.wrap("image assembly (clear copy, dicts)", sanitizer.protector.image)

    def undo() -> None:
        for module, name, fn in originals:
            setattr(module, name, fn)
        Aead.seal = seal  # type: ignore[method-assign]
        BlindIndex.token = token  # type: ignore[method-assign]

    return undo


def profile_local(settings: Settings, records: int, *, cprofile_out: Path | None = None) -> dict[str, Any]:
    """Run the guard's `Sanitizer.process` over the bench records in a loop, without Kafka.

    `cold`: a fresh worker on a branch with no keys yet (every data-subject key is created in Redis on
    first use). `warm`: the same worker's second pass (keys and plans cached). Each is measured without
    instrumentation (events/s), then once more with the stage timers (which add ~0.3 us per wrapped call).
    Keys go to a throw-away branch `benchprof*` that is deleted afterwards. Redis round trips cost what they
    cost on this machine: check `redis-cli --latency` when comparing machines.
    """
    from guard.bench.worker import guard_settings
    from guard.pipeline.runtime import build_sanitizer

    names = Names("prof" + uuid.uuid4().hex[:6])
    workload = build_workload(records, kind="hot")  # the profile's figures (docs/benchmark.md) are of `hot`
    alert_keys = missing_keys(settings.redis_url, drift_alert_keys(workload, settings.tenant))
    bench = guard_settings(names.runid, bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url,
                           group="profile", worker_id="profile")
    result: dict[str, Any] = {"records": records, "mean_value_bytes": round(workload.mean_value_bytes(), 1),
                              "customers": workload.customers}
    try:
        for phase in ("cold", "warm"):
            plain_run, timed_run = build_sanitizer(bench), build_sanitizer(bench)
            if phase == "warm":
                _process_all(plain_run, names, workload)
                _process_all(timed_run, names, workload)
            seconds = _process_all(plain_run, names, workload)
            if phase == "cold":
                cleanup_redis(settings.redis_url, names, [])  # the timed run must create the keys again
            timer = StageTimer()
            undo = _instrument(timed_run, timer)
            try:
                instrumented = _process_all(timed_run, names, workload)
            finally:
                undo()
            result[phase] = _stage_report(records, seconds, instrumented, timer)
        if cprofile_out is not None:
            import cProfile

            sanitizer = build_sanitizer(bench)
            _process_all(sanitizer, names, workload)
            profiler = cProfile.Profile()
            profiler.runcall(_process_all, sanitizer, names, workload)
            profiler.dump_stats(str(cprofile_out))
            result["cprofile"] = str(cprofile_out)
    finally:
        cleanup_redis(settings.redis_url, names, alert_keys)
    return result


def _process_all(sanitizer: Any, names: Names, workload: Workload) -> float:
    """Seconds to run every workload record through `sanitizer.process` (the live path's transform)."""
    templates, ts_ms = workload.templates, int(time.time() * 1000)
    topics = {table: names.input(table) for table in workload.tables}
    process = sanitizer.process
    start = time.perf_counter()
    for offset, template in enumerate(workload.order):
        table, key, _ = templates[template]
        process(topics[table], 0, offset, key, workload.value(template, ts_ms))
    return time.perf_counter() - start


def _stage_report(records: int, seconds: float, instrumented: float, timer: StageTimer) -> dict[str, Any]:
    stages = sorted(timer.seconds.items(), key=lambda kv: -kv[1])
    accounted = sum(timer.seconds.values())
    rows = [{"stage": s, "us_per_event": round(t / records * 1e6, 1), "share_pct": round(t / instrumented * 100, 1),
             "calls_per_event": round(timer.calls[s] / records, 2)} for s, t in stages]
    rows.append({"stage": "rest of process() (envelope dispatch, record dicts, outcome)",
                 "us_per_event": round((instrumented - accounted) / records * 1e6, 1),
                 "share_pct": round((instrumented - accounted) / instrumented * 100, 1), "calls_per_event": 1.0})
    return {"events_per_s": round(records / seconds), "us_per_event": round(seconds / records * 1e6, 1),
            "instrumented_us_per_event": round(instrumented / records * 1e6, 1), "stages": rows}


def render_profile(result: dict[str, Any]) -> str:
    out = [f"local sanitizer loop (no Kafka), {result['records']:,} events of {result['mean_value_bytes']:.0f} B"]
    for phase in ("cold", "warm"):
        r = result[phase]
        out += ["", f"{phase}: {r['events_per_s']:,} events/s ({r['us_per_event']} us/event; "
                f"{r['instrumented_us_per_event']} us instrumented)",
                f"  {'stage':<62} {'us/event':>9} {'share':>6} {'calls/ev':>8}"]
        out += [f"  {row['stage']:<62} {row['us_per_event']:>9.1f} {row['share_pct']:>5.1f}% "
                f"{row['calls_per_event']:>8.2f}" for row in r["stages"]]
    return "\n".join(out)
