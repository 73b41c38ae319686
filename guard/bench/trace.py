"""Where a latency phase's slow events come from (`python -m guard.bench --latency-trace FILE`).

The latency probe knows, per event, when it was sent and how long it took to become readable downstream;
it does not know why. This module records what the guard worker did and when (`WorkerTrace`: spans of
its batches, key loads, value-cache clears, commits and their parts, maintenance, garbage collections),
and lines the two up (`attribute`): for every event, which worker activity overlapped the interval
between its send and its arrival. Comparing the overlap of the slowest 1% with that of all events says
which activity the p99 waits on, with evidence rather than a guess.

The worker side is installed by `guard.bench.worker --trace FILE` only (the product code carries no
tracing): it wraps methods of one `SanitizerWorker` and its sanitizer, key manager and key store, each
wrapper an append to a list (~1 µs per call, a few calls per batch), written out by a daemon thread.
Each span is `[start epoch ms, duration ms, kind, count]`; `count` is what the kind counts (records,
keys, subjects), or -1.
"""

from __future__ import annotations

import bisect
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from guard.bench.common import percentile

#: Kinds of spans a worker records (the report orders them by their overlap with the slow events).
#: `batch`: a fetched batch's transform (native runs, Python path, key loads inside it); `commit`: the whole
#: commit, of which `offsets_wait` is the wait for the offsets sent with the chains' tails, `txn_commit` the
#: EndTxn wait, `commit_view`, `activity` (the wait for the batch's activity writes), `expiry` (root changes
#: and expiries) key-store calls; `decode_load`: reading a batch's
#: subjects and loading their keys, of which `keys_load` is the key manager's part (`count` keys asked
#: for) and `keys_rpc` its key-store round trips (reading keys, offering new ones); `memo_clear`: the value
#: caches emptied every key-cache TTL; `policy_refresh`: the policy's reload check (staff from the branch
#: database every 30 s); `maintenance`, `idle_checkpoints`: the jobs between transactions; `gc<N>`: a
#: collection of generation N.
KINDS = ("batch", "keys_load", "keys_rpc", "decode_load", "memo_clear", "policy_refresh", "commit", "checkpoints",
         "commit_view", "activity", "expiry", "offsets_wait", "txn_send_offsets", "txn_commit", "chains_committed",
         "maintenance", "idle_checkpoints", "gc0", "gc1", "gc2")


class WorkerTrace:
    """Spans of one guard worker's activity, appended in memory and written to `path` as JSON lines."""

    def __init__(self, path: Path, flush_s: float = 0.5) -> None:
        self.path = path
        self._spans: list[list[Any]] = []
        self._file = path.open("wb")
        self._stop = threading.Event()
        self._gc_started = 0.0
        self._thread = threading.Thread(target=self._flush_loop, args=(flush_s,), name="bench-trace", daemon=True)
        self._thread.start()

    def add(self, start_s: float, end_s: float, kind: str, count: int = -1) -> None:
        """Record one span (epoch seconds); a list append, safe from any thread under the GIL."""
        self._spans.append([round(start_s * 1000, 3), round((end_s - start_s) * 1000, 3), kind, count])

    def wrap(self, owner: Any, name: str, kind: str, count: Callable[..., int] | None = None,
             keep: Callable[[Any, float], bool] | None = None) -> None:
        """Replace `owner.name` (an instance attribute shadowing the method) by a timed wrapper.

        `count(*args)` gives the span's count from the call's arguments; `keep(owner, took_s)` decides
        whether the span is recorded (e.g. only when the value caches were really emptied).
        """
        original = getattr(owner, name)
        add, clock = self.add, time.time

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            n = count(*args) if count is not None else -1
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                end = clock()
                if keep is None or keep(owner, end - start):
                    add(start, end, kind, n)

        setattr(owner, name, timed)

    def install(self, worker: Any) -> None:
        """Trace a `SanitizerWorker`'s batches, commits and periodic jobs, its key loads and value-cache
        clears, and the process's garbage collections."""
        sanitizer = worker.sanitizer
        keys = sanitizer.keys
        store = keys.store
        self.wrap(worker, "_process_batch", "batch", count=len)
        self.wrap(worker, "_commit", "commit", count=lambda: worker._txn_records)  # noqa: SLF001
        self.wrap(worker, "_maintenance", "maintenance")
        self.wrap(worker, "_idle_checkpoints", "idle_checkpoints")
        self.wrap(worker, "_chains_committed", "chains_committed")
        self.wrap(worker, "_early_offsets_cover_batch", "offsets_wait")
        original_txn = worker._txn  # noqa: SLF001

        def txn(what: str, call: Callable[[], object], deadline_s: float | None = None) -> None:
            start = time.time()
            try:
                original_txn(what, call, deadline_s)
            finally:
                self.add(start, time.time(), "txn_" + what.replace(" ", "_"))

        worker._txn = txn  # noqa: SLF001
        self.wrap(worker.chains, "checkpoints", "checkpoints")
        since = {"at": sanitizer._value_caches_since}  # noqa: SLF001

        def cleared(owner: Any, _took: float) -> bool:
            now = owner._value_caches_since  # noqa: SLF001
            changed = now != since["at"]
            since["at"] = now
            return changed

        self.wrap(sanitizer, "expire_value_caches", "memo_clear", keep=cleared)
        self.wrap(sanitizer, "_decode_and_load", "decode_load")
        self.wrap(keys, "prefetch", "keys_load", count=lambda _branch, subjects: len(subjects))
        self.wrap(store, "get_or_create_deks", "keys_rpc", count=lambda _branch, items: len(items))
        self.wrap(store, "get_deks", "keys_rpc", count=lambda _branch, subjects: len(subjects))
        self.wrap(store, "commit_view", "commit_view")
        # the commit's wait for the batch's activity writes (sent while the batch ran: `Sanitizer.send_activity`)
        self.wrap(sanitizer, "activity_written", "activity")
        # the commit's root changes and retention expiries (one call; `set_expiry` inside it when no root came back)
        self.wrap(store, "root_changed", "expiry",
                  count=lambda _branch, _roots, expiries=None: len(expiries or ()))
        if sanitizer.checker is not None:
            self.wrap(sanitizer.checker, "refresh", "policy_refresh", keep=lambda _o, took: took > 0.001)
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.time()
        else:
            self.add(self._gc_started, time.time(), f"gc{info.get('generation', 0)}", info.get("collected", -1))

    def _flush_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.flush()

    def flush(self) -> None:
        spans, self._spans = self._spans, []
        if spans:
            self._file.write(b"".join(orjson.dumps(s) + b"\n" for s in spans))
            self._file.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self.flush()
        self._file.close()


def read_spans(paths: Iterable[Path], start_ms: float, end_ms: float) -> list[list[Any]]:
    """The spans of trace files that overlap [start_ms, end_ms], ordered by start (an unreadable line is skipped:
    a worker killed mid-write leaves half a line)."""
    spans = []
    for path in paths:
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                span = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if span[0] <= end_ms and span[0] + span[1] >= start_ms:
                spans.append(span)
    spans.sort(key=lambda s: s[0])
    return spans


def attribute(sent_ms: list[float], latency_ms: list[float], spans: list[list[Any]], *,
              slow_pct: float = 99.0, stalls: int = 10) -> dict[str, Any]:
    """Which worker activity the slowest events waited through, against all events.

    For every event, the milliseconds each kind of span overlapped the interval from its send to its
    arrival downstream. `kinds[kind]`: the mean overlap over the events at or above the `slow_pct`
    percentile (`slow_mean_ms`) and over all events (`all_mean_ms`), and the share of slow events that
    overlapped at least one span of the kind (`slow_share`; `all_share` for every event). A kind whose
    slow mean is a large part of the slow latency, and far above its mean over all events, is where the
    p99 comes from. `stalls`: the longest spans in the phase, with how many slow events they overlapped.
    """
    if not sent_ms:
        return {"events": 0}
    threshold = percentile(latency_ms, slow_pct)
    starts = [s[0] for s in spans]
    longest = max((s[1] for s in spans), default=0.0)
    totals: dict[str, list[float]] = {}  # kind -> [all overlap ms, all events touched, slow ms, slow touched]
    slow_count = 0
    slow_by_span: dict[int, int] = {}
    for sent, lat in zip(sent_ms, latency_ms, strict=True):
        arrived = sent + lat
        slow = lat >= threshold
        slow_count += slow
        lo = bisect.bisect_left(starts, sent - longest)
        hi = bisect.bisect_right(starts, arrived)
        touched: dict[str, float] = {}
        for i in range(lo, hi):
            start, dur, kind, _ = spans[i]
            overlap = min(start + dur, arrived) - max(start, sent)
            if overlap > 0:
                touched[kind] = touched.get(kind, 0.0) + overlap
                if slow:
                    slow_by_span[i] = slow_by_span.get(i, 0) + 1
        for kind, ms in touched.items():
            row = totals.setdefault(kind, [0.0, 0.0, 0.0, 0.0])
            row[0] += ms
            row[1] += 1
            if slow:
                row[2] += ms
                row[3] += 1
    n = len(sent_ms)
    kinds = {kind: {"slow_mean_ms": round(row[2] / max(slow_count, 1), 1), "all_mean_ms": round(row[0] / n, 1),
                    "slow_share": round(row[3] / max(slow_count, 1), 3), "all_share": round(row[1] / n, 3)}
             for kind, row in sorted(totals.items(), key=lambda kv: -kv[1][2])}
    slow_lat = [lat for lat in latency_ms if lat >= threshold]
    t0 = min(sent_ms)
    top = sorted(range(len(spans)), key=lambda i: -spans[i][1])[:stalls]
    return {"events": n, "slow_events": slow_count, "threshold_ms": round(threshold, 1),
            "slow_mean_latency_ms": round(sum(slow_lat) / max(len(slow_lat), 1), 1),
            "all_mean_latency_ms": round(sum(latency_ms) / n, 1), "spans": len(spans), "kinds": kinds,
            "longest_spans": [{"at_s": round((spans[i][0] - t0) / 1000, 3), "ms": round(spans[i][1], 1),
                               "kind": spans[i][2], "count": spans[i][3], "slow_events": slow_by_span.get(i, 0)}
                              for i in top]}


def render_attribution(mode: str, found: dict[str, Any], limit: int = 8) -> list[str]:
    """Text lines of `attribute`'s result for the report."""
    if not found.get("events"):
        return [f"latency trace ({mode}): no events"]
    out = [f"latency trace ({mode}): {found['slow_events']} events >= p99 {found['threshold_ms']} ms "
           f"(mean {found['slow_mean_latency_ms']} ms; all {found['events']} events: mean "
           f"{found['all_mean_latency_ms']} ms); worker time overlapping them, ms (share of events touched), "
           "slow vs all:"]
    for kind, row in list(found["kinds"].items())[:limit]:
        out.append(f"  {kind:<18} {row['slow_mean_ms']:>8.1f} ({row['slow_share']:.0%})  vs {row['all_mean_ms']:>7.1f} "
                   f"({row['all_share']:.0%})")
    spans = ", ".join(f"{s['kind']} {s['ms']:.0f} ms at {s['at_s']:.1f} s ({s['count']}; {s['slow_events']} slow)"
                      for s in found["longest_spans"][:5])
    out.append(f"  longest spans: {spans}")
    return out


def run_traced(out: Path, worker_id: str) -> int:
    """`guard run` of the branch this environment configures, its activity traced to `out` (the guard
    of `--db-latency` when `--latency-trace` is given)."""
    import logging
    import sys

    from guard.config import load_settings
    from guard.kafka.runner import SanitizerWorker
    from guard.pipeline.runtime import build_sanitizer

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings(None, worker_id=worker_id)
    worker = SanitizerWorker(settings, build_sanitizer(settings))
    worker.install_signal_handlers()
    tracer = WorkerTrace(out)
    tracer.install(worker)
    try:
        worker.run()
    finally:
        tracer.close()
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m guard.bench.trace",
                                     description="guard run with its activity traced (--db-latency --latency-trace)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker-id", required=True)
    cli = parser.parse_args()
    sys.exit(run_traced(cli.out, cli.worker_id))
