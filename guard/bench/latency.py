"""The latency probe: end-to-end latency from send time to sanitized output, percentiles, broker GC pauses."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, TopicPartition

from guard.bench.common import TS_TAIL, BenchError, log, percentile
from guard.bench.topics import pace
from guard.bench.workers import BenchContext, GroupProgress, WorkerSet
from guard.bench.workload import Workload
from guard.kafka.batching import take
from guard.kafka_security import client_config
from guard.stack.broker import Broker
from guard.stack.config import StackConfig


# --- latency ---------------------------------------------------------------------------------------
def plain_ts(value: bytes) -> int:
    """Envelope ts_ms of an unchanged change event (the plain loop's output)."""
    return int(value[-TS_TAIL:-1])


def sanitized_head(value: bytes) -> tuple[int | None, int | None, str]:
    """(`ts_ms`, `source_ts_ms`, `position`) of a sanitized record: fields 6 to 8 of sanitized_change.

    Read straight from the Avro bytes (skip v, op, table, branch and db, then the unions): a full fastavro
    decode costs ~50 µs a record, which at thousands of records a second delayed the probe itself and
    inflated the latencies it measured. `tests/unit/test_bench_probe.py` checks it against `decode`.
    """
    pos = 10 if value[:2] == b"\xc3\x01" else 5  # single-object header, else Confluent wire format

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = value[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return (result >> 1) ^ -(result & 1)
            shift += 7

    varint()  # v
    for _ in range(4):  # op, table, branch, db
        length = varint()  # read first: `pos += varint()` would add to the position from before the read
        pos += length
    ts_ms = varint() if varint() == 1 else None  # union branch: 0 = null
    source_ts = varint() if varint() == 1 else None
    length = varint()
    return ts_ms, source_ts, value[pos:pos + length].decode()


def sanitized_ts(value: bytes) -> int:
    """Envelope ts_ms carried by a sanitized record (`sanitized_head`'s first field)."""
    ts_ms = sanitized_head(value)[0]
    if ts_ms is None:
        raise BenchError("sanitized record without ts_ms")
    return ts_ms


def topic_partitions(consumer: Consumer, topic: str, timeout: float = 30) -> int:
    """Partition count of `topic` once its metadata is known (the guard creates its outputs lazily)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return len(meta.partitions)
        time.sleep(0.2)
    raise BenchError(f"output topic {topic} did not appear")


class LatencyProbe:
    """A read_committed consumer on an output topic computing now - envelope ts_ms for new records."""

    def __init__(self, client: dict[str, Any], topics: list[str], partitions: int,
                 ts_of: Callable[[bytes], int]) -> None:
        self.ts_of = ts_of
        self.samples: list[float] = []
        self.sent_at: list[int] = []
        self.since_ms = 0
        self._stop = threading.Event()
        self.consumer = Consumer({**client, "group.id": f"bench-probe-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 10, "fetch.min.bytes": 1})
        starts = [TopicPartition(topic, p, self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                  for topic in topics for p in range(topic_partitions(self.consumer, topic) or partitions)]
        self.consumer.assign(starts)
        self._partitions = starts
        self._fetching = threading.Event()
        started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)
        self._thread.start()
        # Until every partition has had a fetch answered, the probe would stamp records late by its own
        # start-up (connecting, the first read_committed fetch) and the phase would measure the instrument.
        if not self._fetching.wait(10):
            log.warning("latency probe on %s: no fetch answered on every partition within 10 s; measuring "
                        "anyway (its start-up may count as latency)", ", ".join(topics))
            self._fetching.set()  # the probe thread stops discarding and measures from here on
        self.ready_s = time.monotonic() - started

    def _fetched_everywhere(self) -> bool:
        """Whether each partition's watermarks are known: librdkafka caches them from fetch responses."""
        return all(self.consumer.get_watermark_offsets(tp, cached=True)[1] >= 0 for tp in self._partitions)

    def _run(self) -> None:
        ts_of, samples = self.ts_of, self.samples
        # The consumer is used from this thread only (a second thread's calls could wait behind poll()).
        while not self._stop.is_set() and not self._fetching.is_set():
            # Whatever this takes was written before the phase (`since_ms` is set once the probe is ready).
            take(self.consumer, 1000, 0.01)
            if self._fetched_everywhere():
                self._fetching.set()
        while not self._stop.is_set():
            # Block only until the first record arrives, then take what is fetched: a batch consume() would
            # hold early records until its timeout and add that wait to their measured latency.
            msgs, _ = take(self.consumer, 1000, 0.05)
            now_ms = time.time() * 1000  # when the batch became visible, before any decoding
            for msg in msgs:
                value = msg.value()
                if msg.error() is not None or value is None:
                    continue
                sent = ts_of(value)
                if sent >= self.since_ms:
                    samples.append(now_ms - sent)
                    self.sent_at.append(sent)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.samples) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


@dataclass
class LatencyResult:
    rate_target: float
    rate_achieved: float
    seconds: float
    sent: int
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Per second of the phase: [second, records, p50 ms, max ms]; shows whether a p99 is one stall or drift.
    timeline: list[list[float]] = field(default_factory=list)
    #: The local broker's GC pauses in the phase: [second (as in `timeline`, when the pause ended), ms]; None
    #: when the bench's broker is not the local stack's (no GC log to read).
    broker_gc_pauses: list[list[float]] | None = None
    #: How long the probe took to have a fetch answered on every partition, before the pacer started.
    probe_ready_s: float = 0.0
    #: Paced seconds before the measured window (`seconds`), not counted.
    warmup_s: float = 0.0
    #: `--latency-trace`: the guard worker's activity lined up with the slowest events (`trace.attribute`).
    trace: dict[str, Any] | None = None


def measure_latency(ctx: BenchContext, workers: WorkerSet, workload: Workload, rate: float, seconds: float,
                    warmup_s: float = 1.0) -> LatencyResult:
    """Pace `rate` events/s for `warmup_s` + `seconds` through caught-up workers; the latency of the
    records sent in the last `seconds` (the steady state at that rate, not the switch from a drain)."""
    names, client = ctx.names, client_config(ctx.settings)
    is_guard = workers.mode == "guard"
    out_topics = [names.sanitized(t) for t in ctx.tables] if is_guard else [names.plain_out]
    probe = LatencyProbe(client, out_topics, ctx.partitions, sanitized_ts if is_guard else plain_ts)
    probe.since_ms = int((time.time() + warmup_s) * 1000)
    try:
        sent, achieved = pace(client, names, workload, rate, warmup_s + seconds, workers.check_alive)
        expected = max(int(sent - warmup_s * achieved) - 5, 1)
        progress = GroupProgress.of(ctx, workers)
        try:
            progress.wait(progress.ends(), workers, timeout=60)
        finally:
            progress.close()
        probe.wait_for(expected, timeout=15)
    finally:
        probe.close()
    values = probe.samples
    pauses = None
    if ctx.broker_gc_log is not None:
        pauses = broker_gc_pauses(ctx.broker_gc_log, probe.since_ms / 1000, time.time())
    found = None
    if ctx.trace is not None:
        found = trace_phase(ctx.trace, workers.mode, probe.sent_at, values, [p.trace_path for p in workers.procs])
    return LatencyResult(rate, achieved, seconds, sent, len(values), percentile(values, 50), percentile(values, 99),
                         max(values) if values else float("nan"), timeline(probe.sent_at, values, probe.since_ms),
                         pauses, round(probe.ready_s, 3), warmup_s, found)


def trace_phase(out: dict[str, Any], mode: str, sent_ms: list[int], latency_ms: list[float],
                paths: list[Path | None]) -> dict[str, Any] | None:
    """A latency phase's samples (and, for guard workers, their activity spans and `trace.attribute`) into
    `out[mode]`, which `--latency-trace` writes to its file; returns the attribution (None: no spans)."""
    from guard.bench.trace import attribute, read_spans

    sent = [float(s) for s in sent_ms]
    entry: dict[str, Any] = {"samples": [[s, round(lat, 2)] for s, lat in zip(sent, latency_ms, strict=True)]}
    found = None
    files = [p for p in paths if p is not None]
    if files and sent:
        # The workers flush their spans every 0.5 s; they are still running here.
        time.sleep(1.0)
        spans = read_spans(files, min(sent) - 2000, max(s + lat for s, lat in zip(sent, latency_ms, strict=True)))
        found = attribute(sent, latency_ms, spans)
        entry["spans"] = spans
        entry["attribution"] = found
    out[mode] = entry
    return found


#: `-Xlog:gc` with the `time` decorator: `[2026-12-01T17:07:26.112+0000][534.825s] GC(182) Pause Young
#: (Normal) (G1 Evacuation Pause) 341M->142M(1024M) 125.970ms`; the time is when the pause ended.
_GC_PAUSE = re.compile(r"^\[(\d{4}-\d\d-\d\dT[\d:.]+[+-]\d{4})\].* GC\(\d+\) Pause .* ([\d.]+)ms$")


def local_broker(bootstrap: str) -> Broker | None:
    """The `guard stack up` broker, if it is running and is the broker at `bootstrap`.

    A broker from `docker-compose.yml` listens on the same address, but a log or a pid file left by an
    earlier local stack says nothing about it.
    """
    cfg = StackConfig.from_env()
    if bootstrap != cfg.bootstrap:
        return None
    broker = Broker(cfg)
    return broker if broker.pid() is not None else None


def broker_uptime_s(broker: Broker | None) -> float | None:
    """Seconds since the local broker started, or None if the bench uses another broker.

    A fresh broker is slower for its first minutes (its JIT compiler takes a good part of a core for about
    a minute, docs/benchmark.md, round 7); the report says so rather than let a first run pass for typical.
    """
    pid = broker.pid() if broker is not None else None
    if pid is None:
        return None
    try:
        return round(time.time() - psutil.Process(pid).create_time(), 1)
    except psutil.Error:
        return None


def broker_gc_pauses(log: Path, start_s: float, end_s: float) -> list[list[float]]:
    """[seconds after `start_s`, ms] of every stop-the-world pause that ended between the two epoch times.

    A latency phase's stall that lines up with one of these was the broker stopping every produce, fetch
    and commit, not the worker (docs/benchmark.md, round 7). The JVM rotates the log to `<name>.0`; that
    file is read first, in case the rotation fell inside the window.
    """
    pauses: list[list[float]] = []
    lines: list[str] = []
    for path in (log.with_name(log.name + ".0"), log):
        try:
            lines += path.read_text(errors="replace").splitlines()
        except OSError:
            continue
    for line in lines:
        m = _GC_PAUSE.match(line)
        if m is None:
            continue
        ended = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        if start_s <= ended <= end_s:
            pauses.append([round(ended - start_s, 3), float(m.group(2))])
    return pauses


def timeline(sent_at: list[int], latencies: list[float], since_ms: int) -> list[list[float]]:
    """Latency per second of send time: [second, records, p50 ms, max ms]."""
    buckets: dict[int, list[float]] = {}
    for sent, latency in zip(sent_at, latencies, strict=True):
        buckets.setdefault((sent - since_ms) // 1000, []).append(latency)
    return [[float(sec), float(len(v)), round(percentile(v, 50), 1), round(max(v), 1)]
            for sec, v in sorted(buckets.items())]
