"""`guard bench`: the guard's sanitizer against a plain exactly-once loop, on the same records, in one run.

Why it is built this way:

- **Same records, same plumbing.** One raw-looking topic `bench<runid>.public.customers` is filled once with
  Debezium JSON change events of the demo `customers` table (shape of the live connector: no schema wrapper,
  `birth_date` as days since the epoch, the table's `created_at` column included). Both modes read it with
  the same consumer settings, batch policy and exactly-once protocol (see `guard.bench.worker`); only the
  transform differs. The plain loop copies values unchanged; the guard runs the real `SanitizerWorker`.
- **Processes, not threads.** Every worker is its own OS process, so W workers really run in parallel and
  each one's RSS is sampled on its own (psutil, from this parent).
- **Throughput window.** From the first record a worker hands to its transform to the commit that made the
  group's committed offsets cover every input record (workers report both; the parent confirms completion
  from the group's committed offsets). Process start-up and the group join are excluded for both modes.
- **Trials.** The throughput of each mode is measured `--trials` times (default 3), alternating plain and
  guard, each trial a fresh consumer group over the whole topic; a guard trial uses a branch of its own, so
  every trial creates its customers' data keys as the first one did. Each mode's figure is its median trial,
  and the ratio is median guard over median plain. On a shared machine one short plain window (about 2 s
  for 200k records) moved by half between runs; alternating trials spread a slow spell over both modes.
- **Latency.** With the workers caught up, a paced producer writes at half the guard's measured maximum rate
  and a read_committed consumer on the output topic computes `now - ts_ms` of the change event's envelope.
  The envelope time is stamped at send time, so this is true end to end (producer, broker, fetch, transform,
  transaction commit, LSO, downstream fetch) and doesn't depend on the runner carrying record timestamps.
- **Noise.** The machine is shared with the broker, Connect and PostgreSQL; numbers are only comparable
  within one run, which is why the ratio, not the absolute rate, is the headline (the last line printed).

Run `python -m guard.bench --help` for every option; `guard bench` exposes records, partitions, workers and
the JSON file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
import psutil
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from guard.config import Settings, load_settings
from guard.errors import GuardError
from guard.kafka.batching import take
from guard.protect.fastpath import use_native
from guard.stack.broker import Broker
from guard.stack.config import StackConfig
from guard.workload import synth

log = logging.getLogger("guard.bench")

#: 13 digits, so every event's value ends in `"ts_ms":<13 digits>}` and the send time can be spliced in.
_TS_SENTINEL = 9_999_999_999_999
_TS_TAIL = len(b"9999999999999}")
_EPOCH_DAY = dt.date(1970, 1, 1)

TARGET_RATIO = 0.30
TARGET_P99_MS = 250.0
TARGET_RSS_DRIFT_PCT = 10.0
TARGET_SCALING = 1.6
SOAK_TARGET_S = 600
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


class BenchError(GuardError):
    """The benchmark could not run or a phase did not finish; the message says which and why."""


# --- the records ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Pre-encoded change events: `templates[i]` is (key, value without its closing `ts_ms}`)."""

    templates: list[tuple[bytes, bytes]]
    order: list[int]
    customers: int
    updates: int

    def value(self, template: int, ts_ms: int) -> bytes:
        """The event's value with the envelope's `ts_ms` set (the latency phase stamps the send time)."""
        return self.templates[template][1] + b"%d}" % ts_ms

    def mean_value_bytes(self) -> float:
        sample = self.order[:2000]
        return sum(len(self.templates[i][1]) + _TS_TAIL for i in sample) / max(len(sample), 1)


def _debezium_row(row: dict[str, object], created_at: str) -> dict[str, object]:
    """A synth customer as the PostgreSQL connector emits it (adaptive time: a date is days since epoch)."""
    out = dict(row)
    birth = row["birth_date"]
    if isinstance(birth, dt.date):
        out["birth_date"] = (birth - _EPOCH_DAY).days
    out["created_at"] = created_at
    return out


def _envelope(op: str, before: dict[str, object] | None, after: dict[str, object], lsn: int, ts_ms: int) -> bytes:
    """One change event, `ts_ms` last so it can be replaced by byte splicing (see `Workload.value`)."""
    source = {
        "version": "3.6.1.Final", "connector": "postgresql", "name": "br0101", "ts_ms": ts_ms,
        "snapshot": "false", "db": "branch_0101", "sequence": f'["{lsn - 8}","{lsn}"]',
        "ts_us": ts_ms * 1000, "ts_ns": ts_ms * 1_000_000, "schema": "public", "table": "customers",
        "txId": lsn // 64, "lsn": lsn, "xmin": None,
    }
    event = {"before": before, "after": after, "source": source, "transaction": None, "op": op,
             "ts_ms": _TS_SENTINEL}
    return orjson.dumps(event)


def build_workload(records: int, *, customers: int = 4000, update_share: float = 0.15, seed: int = 7) -> Workload:
    """`records` events over `customers` distinct synth customers (~85% creates, ~15% updates).

    Each customer has one create and one update template (new mobile and address, before and after
    images); records pick a customer at random, so the guard's key caches miss once per customer and
    worker, as they would on a branch with a few thousand active customers.
    """
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    templates: list[tuple[bytes, bytes]] = []
    for cid in range(1, customers + 1):
        created = dt.datetime.fromtimestamp(now_ms / 1000 - rng.randint(0, 86_400 * 365), dt.UTC)
        row = _debezium_row(synth.new_customer(rng, cid), created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        changed = dict(row, mobile=synth.mobile(rng), address=synth.address(rng))
        key = orjson.dumps({"customer_id": cid})
        lsn = 26_735_008 + cid * 4096
        for value in (_envelope("c", None, row, lsn, now_ms), _envelope("u", row, changed, lsn + 512, now_ms)):
            if not value.endswith(b'"ts_ms":%d}' % _TS_SENTINEL):
                raise BenchError("internal: change event does not end with the ts_ms sentinel")
            templates.append((key, value[:-_TS_TAIL]))
    order = [2 * rng.randrange(customers) + (rng.random() < update_share) for _ in range(records)]
    return Workload(templates, order, customers, sum(i % 2 for i in order))


# --- topics and groups ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Names:
    """Every topic and group of one run, all carrying `bench<runid>` so cleanup can find them."""

    runid: str

    @property
    def prefix(self) -> str:
        return f"bench{self.runid}"

    @property
    def input(self) -> str:
        return f"{self.prefix}.public.customers"

    @property
    def plain_out(self) -> str:
        # Not `<prefix>.plain.out`: that would match the guard's raw pattern `^<prefix>\.[^.]+\.[^.]+$`.
        return f"{self.prefix}-plain.out"

    @property
    def sanitized(self) -> str:
        return f"sanitized.{self.input}"

    def group(self, mode: str) -> str:
        return f"{self.prefix}-{mode}"


def create_topic(admin: AdminClient, topic: str, partitions: int) -> None:
    """Create `topic` and wait until its metadata shows every partition."""
    futures = admin.create_topics([NewTopic(topic, partitions, 1)])
    futures[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and len(meta.partitions) == partitions:
            return
        time.sleep(0.2)
    raise BenchError(f"topic {topic} did not appear with {partitions} partitions")


def cleanup_kafka(admin: AdminClient, names: Names, groups: Iterable[str]) -> list[str]:
    """Delete the run's topics (any topic naming `bench<runid>`) and consumer groups."""
    topics = [t for t in admin.list_topics(timeout=10).topics if names.prefix in t]
    if topics:
        for topic, future in admin.delete_topics(topics, operation_timeout=30).items():
            try:
                future.result(timeout=60)
            except KafkaException as exc:
                log.warning("could not delete topic %s: %s", topic, exc)
    group_list = list(groups)
    if group_list:
        for group, future in admin.delete_consumer_groups(group_list, request_timeout=30).items():
            try:
                future.result(timeout=60)
            except KafkaException as exc:
                log.debug("could not delete group %s: %s", group, exc)
    return topics


def drift_alert_keys(workload: Workload) -> list[str]:
    """Redis marks of the drift alerts the bench can raise: one per column the catalog doesn't know.

    The sanitizer deduplicates drift alerts per table and column (not per branch), so the bench's events
    share these marks with the live pipeline; see `cleanup_redis`.
    """
    from guard.classify.catalog import Catalog
    from guard.classify.plans import Classifier

    row = orjson.loads(workload.value(0, 0))["after"]
    plan = Classifier(Catalog.load(None)).plan("public.customers", row)
    return [f"bg:alerted:drift:public.customers:{p.name}" for p in plan.unclassified]


def cleanup_redis(redis_url: str, names: Names, fresh_alert_keys: list[str]) -> int:
    """Delete the run's keys (its branch is `bench<runid>`) and drift-alert marks it created.

    Alert marks are shared across branches (keyed by table and column), so only marks that did not exist
    before the run are removed; the live pipeline's marks are left alone.
    """
    try:
        return _delete_keys(redis_url, f"bg:*:{names.prefix}*", fresh_alert_keys)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the run's own result or error
        log.warning("could not remove the bench's Redis keys (bg:*:%s*): %s", names.prefix, exc)
        return 0


def _delete_keys(redis_url: str, pattern: str, extra: list[str]) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    if extra:
        deleted += int(client.delete(*extra))
    return deleted


def missing_keys(redis_url: str, keys: list[str]) -> list[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    return [k for k in keys if not client.exists(k)]


# --- filling and pacing -----------------------------------------------------------------------------
def _fill_producer(bootstrap: str, linger_ms: int) -> Producer:
    """A plain producer like Kafka Connect's (acks=all, Java's murmur2 partitioner, no compression)."""
    return Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "partitioner": "murmur2_random",
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    })


def _produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.05)


def fill(bootstrap: str, topic: str, workload: Workload) -> float:
    """Produce every record of the workload once; returns records/s (not timed against either mode)."""
    producer = _fill_producer(bootstrap, 20)
    start = time.monotonic()
    ts_ms = int(time.time() * 1000)
    for n, template in enumerate(workload.order):
        _produce(producer, topic, workload.templates[template][0], workload.value(template, ts_ms))
        if n % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise BenchError(f"could not write the workload to {topic}")
    return len(workload.order) / (time.monotonic() - start)


def pace(bootstrap: str, topic: str, workload: Workload, rate: float, seconds: float,
         check: Callable[[], None] | None = None) -> tuple[int, float]:
    """Send at `rate` events/s for `seconds`, stamping each envelope with its send time.

    Returns (events sent, achieved rate). Sends in 2 ms ticks so bursts stay far below one batch;
    `check` (e.g. "are the workers still alive?") runs about once a second and may raise to stop early.
    The producer lingers 5 ms, Kafka 4's default and so what Debezium's Connect producer does: the 1 ms
    used before sent several times more produce requests, and that load on the broker and this process
    (all on the same 2 cores as the worker under test) was part of what the latency phase measured. The
    linger counts in the measured latency (the envelope is stamped before it).
    """
    producer = _fill_producer(bootstrap, 5)
    order, n_order = workload.order, len(workload.order)
    start = time.monotonic()
    sent, checked = 0, start
    while (elapsed := time.monotonic() - start) < seconds:
        if check is not None and start + elapsed - checked >= 1.0:
            checked = start + elapsed
            check()
        due = int(elapsed * rate)
        now_ms = int(time.time() * 1000)
        while sent < due:
            template = order[sent % n_order]
            _produce(producer, topic, workload.templates[template][0], workload.value(template, now_ms))
            sent += 1
        producer.poll(0)
        time.sleep(0.002)
    took = time.monotonic() - start
    producer.flush(30)
    return sent, sent / took


# --- worker processes ------------------------------------------------------------------------------
@dataclass
class WorkerProc:
    """One `guard.bench.worker` process and what it reported on stdout."""

    mode: str
    worker_id: str
    popen: subprocess.Popen[str]
    log_path: Path
    first_t: float | None = None
    commits: list[tuple[float, int]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        """Reader thread: parse the worker's protocol lines (see `guard.bench.worker`)."""
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            event = msg.get("ev")
            if event == "ready":
                self.ready.set()
            elif event == "first" and self.first_t is None:
                self.first_t = float(msg["t"])
            elif event == "commit":
                self.commits.append((float(msg["t"]), int(msg["events"])))
            elif event == "done":
                self.done = msg

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class RssSampler:
    """Samples the RSS of registered processes every `interval` seconds from a daemon thread."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[tuple[float, str, int, int]] = []  # (t, label, pid, rss bytes)
        self._procs: dict[int, tuple[str, psutil.Process]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def add(self, label: str, pid: int) -> None:
        with self._lock:
            self._procs[pid] = (label, psutil.Process(pid))

    def remove(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def peak_mib(self, label: str) -> float:
        values = [rss for _, lab, _, rss in self.samples if lab == label]
        return max(values) / 2**20 if values else 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                procs = list(self._procs.items())
            now = time.time()
            for pid, (label, proc) in procs:
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: RSS reads as 0
                        continue
                    self.samples.append((now, label, pid, proc.memory_info().rss))
                except psutil.Error:
                    continue


@dataclass
class BenchContext:
    """What every phase needs: addresses, names, the sampler and a directory for worker logs."""

    settings: Settings
    names: Names
    partitions: int
    sampler: RssSampler
    log_dir: Path
    groups: set[str] = field(default_factory=set)
    #: The local broker's GC log, or None when the bench runs against another broker (`local_broker`).
    broker_gc_log: Path | None = None


class WorkerSet:
    """W worker processes of one mode in one consumer group."""

    def __init__(self, ctx: BenchContext, mode: str, count: int, group: str, label: str,
                 branch_suffix: str = "") -> None:
        self.ctx, self.mode, self.count, self.group, self.label = ctx, mode, count, group, label
        self.branch_suffix = branch_suffix
        self.procs: list[WorkerProc] = []
        ctx.groups.add(group)

    def start(self) -> WorkerSet:
        for n in range(self.count):
            self.procs.append(self._spawn(f"{self.label}-{n}-{uuid.uuid4().hex[:4]}"))
        deadline = time.monotonic() + 60
        for proc in self.procs:
            if not proc.ready.wait(max(deadline - time.monotonic(), 0.1)):
                self.stop()
                raise BenchError(f"{self.mode} worker {proc.worker_id} did not start:\n{proc.log_tail()}")
        return self

    def _spawn(self, worker_id: str) -> WorkerProc:
        ctx = self.ctx
        cmd = [sys.executable, "-m", "guard.bench.worker", "--mode", self.mode, "--runid", ctx.names.runid,
               "--group", self.group, "--worker-id", worker_id, "--bootstrap", ctx.settings.kafka_bootstrap,
               "--redis-url", ctx.settings.redis_url, "--input-topic", ctx.names.input,
               "--output-topic", ctx.names.plain_out, "--branch-suffix", self.branch_suffix]
        log_path = ctx.log_dir / f"{worker_id}.log"
        with log_path.open("w") as log_file:
            popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1)
        proc = WorkerProc(self.mode, worker_id, popen, log_path)
        threading.Thread(target=proc.read, name=f"read-{worker_id}", daemon=True).start()
        ctx.sampler.add(self.label, popen.pid)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise BenchError(f"{self.mode} worker {proc.worker_id} exited with {proc.popen.returncode}:\n"
                                 f"{proc.log_tail()}")

    def stop(self, timeout: float = 30) -> list[dict[str, Any]]:
        """SIGTERM every worker (each commits its open transaction) and collect the final counts."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in self.procs:
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0fs; killing it", proc.worker_id, timeout)
                proc.popen.kill()
                proc.popen.wait(10)
            self.ctx.sampler.remove(proc.popen.pid)
        time.sleep(0.2)  # let the reader threads take the final line
        return [dict(p.done or {"ev": "missing"}, worker_id=p.worker_id) for p in self.procs]

    def window(self, count: int) -> tuple[float, float] | None:
        """(first record handed to a transform, commit at which the workers' total reached `count`)."""
        firsts = [p.first_t for p in self.procs if p.first_t is not None]
        if not firsts:
            return None
        merged = sorted((t, i, events) for i, p in enumerate(self.procs) for t, events in p.commits)
        latest = [0] * len(self.procs)
        for t, i, events in merged:
            latest[i] = events
            if sum(latest) >= count:
                return min(firsts), t
        return None

    def per_second(self, start: float, end: float) -> list[int]:
        """Events the workers committed in each whole second from `start` to `end`."""
        merged = sorted((t, i, events) for i, p in enumerate(self.procs) for t, events in p.commits)
        latest = [0] * len(self.procs)
        totals = [0] * (int(end - start) + 1)
        for t, i, events in merged:
            latest[i] = events
            if start <= t <= end:
                totals[int(t - start)] = sum(latest)
        for n in range(1, len(totals)):  # seconds without a commit keep the total reached before them
            totals[n] = max(totals[n], totals[n - 1])
        return [b - a for a, b in zip([0, *totals], totals, strict=False)]


# --- committed progress ------------------------------------------------------------------------------
class GroupProgress:
    """Reads a group's committed offsets on the input topic without joining the group."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.topic, self.partitions = topic, partitions
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})

    def committed(self) -> dict[int, int]:
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        return {tp.partition: max(tp.offset, 0) for tp in self.consumer.committed(tps, timeout=10)}

    def ends(self) -> dict[int, int]:
        return {p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                for p in range(self.partitions)}

    def wait(self, targets: dict[int, int], workers: WorkerSet, timeout: float) -> float:
        """Block until every partition's committed offset reaches its target; returns when (epoch s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                committed = self.committed()
            except KafkaException as exc:  # a slow broker answer is not the end of the run
                error = exc.args[0]
                if not (isinstance(error, KafkaError) and (error.retriable() or error.code() == KafkaError._TIMED_OUT)):
                    raise
                log.warning("reading %s's committed offsets: %s; trying again", workers.group, error)
            else:
                if all(committed.get(p, 0) >= end for p, end in targets.items()):
                    return time.time()
            # Also after a failed query: a dead worker ends the wait, and a fast error can't spin.
            workers.check_alive()
            time.sleep(0.1)
        raise BenchError(f"{workers.mode} workers did not commit up to {targets} within {timeout:.0f}s "
                         f"(committed {self.committed()})")

    def close(self) -> None:
        self.consumer.close()


# --- latency ---------------------------------------------------------------------------------------
def plain_ts(value: bytes) -> int:
    """Envelope ts_ms of an unchanged change event (the plain loop's output)."""
    return int(value[-_TS_TAIL:-1])


def sanitized_ts(value: bytes) -> int:
    """Envelope ts_ms carried by a sanitized record (`ts_ms`, the 6th field of sanitized_change).

    Read straight from the Avro bytes (skip v, op, table, branch and db, then the union): a full fastavro
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
    if varint() != 1:  # union branch of ts_ms: 0 = null
        raise BenchError("sanitized record without ts_ms")
    return varint()


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

    def __init__(self, bootstrap: str, topic: str, partitions: int, ts_of: Callable[[bytes], int]) -> None:
        self.ts_of = ts_of
        self.samples: list[float] = []
        self.sent_at: list[int] = []
        self.since_ms = 0
        self._stop = threading.Event()
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-probe-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 10, "fetch.min.bytes": 1})
        count = topic_partitions(self.consumer, topic) or partitions
        starts = [TopicPartition(topic, p, self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                  for p in range(count)]
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
                        "anyway (its start-up may count as latency)", topic)
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


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation, so p99 is a latency that happened."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(int(round(q / 100 * len(ordered) + 0.5)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


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


def measure_latency(ctx: BenchContext, workers: WorkerSet, workload: Workload, rate: float, seconds: float,
                    warmup_s: float = 1.0) -> LatencyResult:
    """Pace `rate` events/s for `warmup_s` + `seconds` through caught-up workers; the latency of the
    records sent in the last `seconds` (the steady state at that rate, not the switch from a drain)."""
    names, bootstrap = ctx.names, ctx.settings.kafka_bootstrap
    is_guard = workers.mode == "guard"
    out_topic = names.sanitized if is_guard else names.plain_out
    probe = LatencyProbe(bootstrap, out_topic, ctx.partitions, sanitized_ts if is_guard else plain_ts)
    probe.since_ms = int((time.time() + warmup_s) * 1000)
    try:
        sent, achieved = pace(bootstrap, names.input, workload, rate, warmup_s + seconds, workers.check_alive)
        expected = max(int(sent - warmup_s * achieved) - 5, 1)
        progress = GroupProgress(bootstrap, workers.group, names.input, ctx.partitions)
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
    return LatencyResult(rate, achieved, seconds, sent, len(values), percentile(values, 50), percentile(values, 99),
                         max(values) if values else float("nan"), timeline(probe.sent_at, values, probe.since_ms),
                         pauses, round(probe.ready_s, 3), warmup_s)


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


# --- phases ----------------------------------------------------------------------------------------
@dataclass
class ThroughputResult:
    events: int
    seconds: float
    events_per_s: float
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Events committed in each second of the window: tells a slow start (new keys) from a steady rate.
    per_second: list[int] = field(default_factory=list)


def drain_fresh(ctx: BenchContext, workers: WorkerSet) -> ThroughputResult:
    """Let a fresh group consume the whole input topic; time it with the workers' own timestamps."""
    bootstrap, names = ctx.settings.kafka_bootstrap, ctx.names
    progress = GroupProgress(bootstrap, workers.group, names.input, ctx.partitions)
    try:
        targets = progress.ends()
        count = sum(targets.values())
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
    return ThroughputResult(count, seconds, count / seconds, per_second=workers.per_second(start, end))


def catch_up(ctx: BenchContext, workers: WorkerSet) -> None:
    """Wait until a (re)started group has committed everything currently in the input topic."""
    progress = GroupProgress(ctx.settings.kafka_bootstrap, workers.group, ctx.names.input, ctx.partitions)
    try:
        targets = progress.ends()
        progress.wait(targets, workers, timeout=120 + sum(targets.values()) / 500)
    finally:
        progress.close()


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
    soak_ctx = BenchContext(ctx.settings, ctx.names, ctx.partitions, sampler, ctx.log_dir, ctx.groups)
    group = WorkerSet(soak_ctx, "guard", workers, guard_group[0], "soak", guard_group[1]).start()
    try:
        catch_up(soak_ctx, group)
        t0 = time.time()
        pace(ctx.settings.kafka_bootstrap, ctx.names.input, workload, rate, seconds, group.check_alive)
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
    """Guard throughput with 1 then 2 workers, each a fresh group over every record now in the topic."""
    results: dict[str, Any] = {}
    for count in (1, 2):
        workers = WorkerSet(ctx, "guard", count, ctx.names.group(f"scale{count}"), f"scale{count}").start()
        try:
            result = drain_fresh(ctx, workers)
        finally:
            result_workers = workers.stop()
        result.workers = result_workers
        results[f"workers_{count}"] = asdict(result)
        log.info("scaling: %d worker(s) %.0f events/s", count, result.events_per_s)
    one, two = results["workers_1"]["events_per_s"], results["workers_2"]["events_per_s"]
    results["speedup"] = two / one if one else float("nan")
    return results


# --- report ----------------------------------------------------------------------------------------
def machine_facts() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "platform": platform.platform(),
    }


def check(name: str, status: str, value: Any, note: str) -> dict[str, Any]:
    return {"target": name, "status": status, "value": value, "note": note}


def target_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's four targets; a target that can't be meaningful here says so instead of passing."""
    ratio = report["ratio"]
    guard_lat = report["modes"]["guard"]["latency"]
    cores = report["machine"]["cores"] or 1
    checks = [
        check("guard throughput >= 30% of plain (exactly-once both)", "pass" if ratio >= TARGET_RATIO else "fail",
              round(ratio, 3), f"ratio {ratio:.3f}"),
        check(f"guard p99 end-to-end < {TARGET_P99_MS:.0f} ms at 50% of its max rate",
              "pass" if guard_lat["p99_ms"] < TARGET_P99_MS else "fail", round(guard_lat["p99_ms"], 1),
              f"at {guard_lat['rate_achieved']:.0f} events/s"),
    ]
    soak_result = report.get("soak")
    if soak_result is None:
        checks.append(check("RSS flat within 10% over a 10-minute run", "not run", None,
                            f"use --soak {SOAK_TARGET_S}"))
    else:
        drift = soak_result["drift_pct"]
        short = soak_result["seconds"] < SOAK_TARGET_S
        status = "pass" if abs(drift) <= TARGET_RSS_DRIFT_PCT else "fail"
        checks.append(check("RSS flat within 10% over a 10-minute run", status, round(drift, 2),
                            f"drift {drift:+.1f}% over {soak_result['seconds']:.0f}s"
                            + (" (shorter than 10 minutes: indicative only)" if short else "")))
    scale = report.get("scaling")
    name = f"2 workers on 2 partitions >= {TARGET_SCALING}x one worker"
    if scale is None:
        checks.append(check(name, "not run", None, "use --scaling"))
    elif cores < 4:
        checks.append(check(name, "n/a", round(scale["speedup"], 2),
                            f"machine has {cores} cores shared with the broker, Connect and PostgreSQL "
                            "(needs >= 4: one per worker plus the broker); measured "
                            f"{scale['speedup']:.2f}x"))
    else:
        checks.append(check(name, "pass" if scale["speedup"] >= TARGET_SCALING else "fail",
                            round(scale["speedup"], 2), f"{scale['speedup']:.2f}x"))
    return checks


def render_table(report: dict[str, Any]) -> str:
    rows = [("mode", "workers", "events/s", "p50 ms", "p99 ms", "peak RSS MiB")]
    for mode in ("plain", "guard"):
        m = report["modes"][mode]
        rows.append((mode, str(report["workers"]), f"{m['events_per_s']:,.0f}", f"{m['latency']['p50_ms']:.1f}",
                     f"{m['latency']['p99_ms']:.1f}", f"{m['peak_rss_mib']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The human report; the caller prints JSON and the `ratio` line after it."""
    w = report["workload"]
    out = [
        f"BranchGuard bench {report['runid']}: {w['records']:,} change events of public.customers "
        f"({w['mean_value_bytes']:.0f} B mean, {w['customers']:,} customers, {w['updates']:,} updates), "
        f"{report['partitions']} partition(s), {report['workers']} worker(s) per mode, exactly-once both, "
        f"guard on its {report['machine'].get('guard_hot_path', '?')} hot path",
        "",
        render_table(report),
        "",
        f"guard/plain throughput: {report['ratio']:.3f} (median trial of each mode)   latency at "
        f"{report['latency_rate']:.0f} events/s (50% of the guard's max), envelope ts_ms to read_committed output",
        "trials (events/s): plain " + ", ".join(f"{v:,.0f}" for v in report["trials"]["plain_events_per_s"])
        + "; guard " + ", ".join(f"{v:,.0f}" for v in report["trials"]["guard_events_per_s"])
        + "; ratios " + ", ".join(f"{v:.3f}" for v in report["trials"]["ratios"]),
    ]
    warmup = report.get("warmup")
    if warmup:
        out.append(f"warm-up before the trials (untimed): {warmup['seconds']:.0f} s, plain "
                   + ", ".join(f"{v:,.0f}" for v in warmup["plain_events_per_s"]) + "; guard "
                   + ", ".join(f"{v:,.0f}" for v in warmup["guard_events_per_s"]) + " events/s")
    pauses = {mode: report["modes"][mode]["latency"].get("broker_gc_pauses") for mode in ("guard", "plain")}
    if all(p is not None for p in pauses.values()):
        out.append("broker GC pauses in the latency phases (local stack): " + "; ".join(
            f"{mode} {len(p)}, longest {max((ms for _, ms in p), default=0):.0f} ms" for mode, p in pauses.items()))
    if report.get("scaling"):
        s = report["scaling"]
        out.append(f"scaling (guard, 2 partitions): 1 worker {s['workers_1']['events_per_s']:,.0f}/s, "
                   f"2 workers {s['workers_2']['events_per_s']:,.0f}/s, speed-up {s['speedup']:.2f}x")
    if report.get("soak"):
        s = report["soak"]
        out.append(f"soak: {s['seconds']:.0f}s at {s['rate']:.0f}/s, RSS {s['first_mib']:.1f} MiB after warm-up -> "
                   f"{s['last_mib']:.1f} MiB in the last {s['window_s']:.0f}s ({s['drift_pct']:+.1f}%)")
    m = report["machine"]
    out += ["", f"machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
            f"load {m['load_avg_1m_at_start']} at start; python {m['python']}, "
            f"confluent-kafka {m['confluent_kafka']}, librdkafka {m['librdkafka']}"]
    uptime = m.get("broker_uptime_s_at_start")
    if uptime is not None and uptime < FRESH_BROKER_S and not warmup:
        out.append(f"note: the local broker had been up {uptime:.0f} s when this run started; a fresh broker is "
                   f"slower for its first minutes (JIT) and this run had no warm-up, so run the bench again (or "
                   f"with --warmup-seconds {WARMUP_S:.0f}) for settled figures")
    out += ["", "targets:"]
    out += [f"  [{c['status'].upper():>7}] {c['target']}: {c['note']}" for c in report["targets"]]
    return "\n".join(out)


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
    sanitizer.emitter._alert_once = timer.wrap("drift-alert dedup (Redis SET NX)", sanitizer.emitter._alert_once)
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
    workload = build_workload(records)
    alert_keys = missing_keys(settings.redis_url, drift_alert_keys(workload))
    bench = guard_settings(names.runid, bootstrap=settings.kafka_bootstrap, redis_url=settings.redis_url,
                           group="profile", worker_id="profile")
    result: dict[str, Any] = {"records": records, "mean_value_bytes": round(workload.mean_value_bytes(), 1),
                              "customers": workload.customers}
    try:
        for phase in ("cold", "warm"):
            plain_run, timed_run = build_sanitizer(bench), build_sanitizer(bench)
            if phase == "warm":
                _process_all(plain_run, names.input, workload)
                _process_all(timed_run, names.input, workload)
            seconds = _process_all(plain_run, names.input, workload)
            if phase == "cold":
                cleanup_redis(settings.redis_url, names, [])  # the timed run must create the keys again
            timer = StageTimer()
            undo = _instrument(timed_run, timer)
            try:
                instrumented = _process_all(timed_run, names.input, workload)
            finally:
                undo()
            result[phase] = _stage_report(records, seconds, instrumented, timer)
        if cprofile_out is not None:
            import cProfile

            sanitizer = build_sanitizer(bench)
            _process_all(sanitizer, names.input, workload)
            profiler = cProfile.Profile()
            profiler.runcall(_process_all, sanitizer, names.input, workload)
            profiler.dump_stats(str(cprofile_out))
            result["cprofile"] = str(cprofile_out)
    finally:
        cleanup_redis(settings.redis_url, names, alert_keys)
    return result


def _process_all(sanitizer: Any, topic: str, workload: Workload) -> float:
    """Seconds to run every workload record through `sanitizer.process` (the live path's transform)."""
    templates, ts_ms = workload.templates, int(time.time() * 1000)
    process = sanitizer.process
    start = time.perf_counter()
    for offset, template in enumerate(workload.order):
        process(topic, 0, offset, templates[template][0], workload.value(template, ts_ms))
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
    customers: int = 4000
    json_out: Path | None = None

    @property
    def smoke(self) -> bool:
        """A short run (tests): fewer than `SMOKE_BELOW_RECORDS` records."""
        return self.records < SMOKE_BELOW_RECORDS

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


def trial_group(ctx: BenchContext, mode: str, trial: int | str) -> tuple[str, str]:
    """(consumer group, guard branch suffix) of a mode's trial; the first trial keeps the plain names.

    A warm-up round is named by a string (`w1`, `w2`, ...) so its groups and keys never meet a trial's.
    """
    if trial == 0:
        return ctx.names.group(mode), ""
    tag = trial if isinstance(trial, str) else f"t{trial}"
    return ctx.names.group(f"{mode}-{tag}"), tag


def run_mode_throughput(ctx: BenchContext, mode: str, workers: int,
                        trial: int | str = 0) -> tuple[WorkerSet, ThroughputResult]:
    """Start W workers of `mode` in the trial's group and drain the input; the workers keep running."""
    group_id, suffix = trial_group(ctx, mode, trial)
    # Warm-up workers are sampled under their own label: their RSS is not the mode's measured peak.
    label = mode if isinstance(trial, int) else f"warmup-{mode}"
    group = WorkerSet(ctx, mode, workers, group_id, label, suffix).start()
    try:
        result = drain_fresh(ctx, group)
    except BaseException:
        group.stop()
        raise
    name = f"trial {trial + 1}" if isinstance(trial, int) else f"warm-up {trial}"
    log.info("%s %s: %d events in %.2fs = %.0f events/s (per second: %s)", mode, name, result.events,
             result.seconds, result.events_per_s, " ".join(map(str, result.per_second)))
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
    """The phases: warm-up, throughput trials (plain, guard, alternating), guard latency, plain latency,
    scaling, soak.

    The last guard trial's workers stay up for the latency phase (caught up, keys warm), and the plain
    latency phase resumes the last plain trial's group.
    """
    warmup = warm_up(ctx, opts.workers, opts.warmup_s())
    trials: dict[str, list[ThroughputResult]] = {"plain": [], "guard": []}
    guard: WorkerSet | None = None
    try:
        for trial in range(opts.trials):
            plain, result = run_mode_throughput(ctx, "plain", opts.workers, trial)
            result.workers = plain.stop()
            trials["plain"].append(result)
            guard, result = run_mode_throughput(ctx, "guard", opts.workers, trial)
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
    rate = guard_tp.events_per_s / 2
    try:
        log.info("guard: latency at %.0f events/s for %.0fs", rate, opts.latency_s())
        guard_lat = measure_latency(ctx, guard, workload, rate, opts.latency_s(), opts.latency_warmup_s())
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
    report: dict[str, Any] = {
        "modes": {
            "plain": {**asdict(plain_tp), "latency": asdict(plain_lat), "peak_rss_mib": ctx.sampler.peak_mib("plain")},
            "guard": {**asdict(guard_tp), "latency": asdict(guard_lat), "peak_rss_mib": ctx.sampler.peak_mib("guard")},
        },
        "ratio": guard_tp.events_per_s / plain_tp.events_per_s,
        "latency_rate": rate,
        "warmup": asdict(warmup) if warmup is not None else None,
        "trials": {
            "plain_events_per_s": [round(r.events_per_s, 1) for r in trials["plain"]],
            "guard_events_per_s": [round(r.events_per_s, 1) for r in trials["guard"]],
            "ratios": [round(g.events_per_s / p.events_per_s, 3)
                       for p, g in zip(trials["plain"], trials["guard"], strict=True)],
        },
    }
    for mode in ("plain", "guard"):
        report["modes"][mode]["events_per_s"] = round(report["modes"][mode]["events_per_s"], 1)
    if opts.scaling:
        report["scaling"] = scaling(ctx)
    if opts.soak_seconds > 0:
        log.info("soak: %.0fs at %.0f events/s", opts.soak_seconds, rate)
        report["soak"] = asdict(soak(ctx, workload, opts.workers, rate, opts.soak_seconds,
                                     trial_group(ctx, "guard", opts.trials - 1)))
    return report


def run(settings: Settings, opts: BenchOptions) -> dict[str, Any]:
    """Set up topics, fill, run every phase, clean up; returns the JSON report."""
    if opts.scaling and opts.partitions < 2:
        raise BenchError("--scaling needs at least 2 partitions")
    if opts.records < 1 or opts.workers < 1 or opts.partitions < 1 or opts.trials < 1:
        raise BenchError("--records, --workers, --partitions and --trials must be positive")
    if not opts.warmup_s() >= 0:  # written so that NaN is refused too
        raise BenchError("--warmup-seconds must be 0 (no warm-up) or more")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
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
    workload = build_workload(opts.records, customers=opts.customers)
    alert_keys = missing_keys(settings.redis_url, drift_alert_keys(workload))
    sampler = RssSampler(0.5)
    ctx = BenchContext(settings, names, opts.partitions, sampler, Path(tempfile.mkdtemp(prefix=f"{names.prefix}-")),
                       broker_gc_log=broker.gc_log if broker is not None and broker.gc_log.is_file() else None)
    try:
        create_topic(admin, names.input, opts.partitions)
        # Both modes' output topics exist before the timed windows: a guard creates a table's sanitized
        # topic once in its life (`TopicManager.ensure_like`), which is not per-event work.
        create_topic(admin, names.plain_out, opts.partitions)
        create_topic(admin, names.sanitized, opts.partitions)
        fill_rate = fill(settings.kafka_bootstrap, names.input, workload)
        log.info("filled %s with %d events (%.0f/s); worker logs in %s", names.input, opts.records, fill_rate,
                 ctx.log_dir)
        report = execute(ctx, workload, opts)
    finally:
        sampler.close()
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
        "workload": {"records": opts.records, "customers": workload.customers, "updates": workload.updates,
                     "mean_value_bytes": round(workload.mean_value_bytes(), 1), "fill_events_per_s": round(fill_rate),
                     "topic": names.input},
        "machine": machine,
        "kept_topics": opts.keep,
    })
    report["targets"] = target_checks(report)
    return report


def emit_report(report: dict[str, Any], json_out: Path | None) -> None:
    """Table, JSON, and the last line `ratio <x.xxx>`."""
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    if json_out is not None:
        json_out.write_text(text + "\n")
    print(render(report))
    print("\nJSON:")
    print(text)
    print(f"ratio {report['ratio']:.3f}", flush=True)


def run_bench(settings: Settings, *, records: int = 200_000, partitions: int = 2, workers: int = 1,
              json_out: Path | None = None, latency_seconds: float | None = None, scaling: bool = False,
              soak_seconds: float = 0.0, keep: bool = False, trials: int = 3,
              warmup_seconds: float | None = None) -> dict[str, Any]:
    """Entry point of `guard bench` (and `python -m guard.bench`): run, print, write JSON, return it."""
    opts = BenchOptions(records=records, partitions=partitions, workers=workers, latency_seconds=latency_seconds,
                        warmup_seconds=warmup_seconds, scaling=scaling, soak_seconds=soak_seconds, keep=keep,
                        json_out=json_out, trials=trials)
    report = run(settings, opts)
    emit_report(report, json_out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guard.bench", description="Plain EOS loop vs the guard.")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3,
                        help="throughput trials per mode, alternating plain and guard; the median counts")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help=f"measured seconds of each latency phase, after {LATENCY_WARMUP_S:.0f} s of paced "
                             "warm-up (default 20 s; 5 s after 1 s below 50k records)")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help=f"untimed plain and guard drains before the trials (default {WARMUP_S:.0f} s; "
                             "none below 50k records; 0 for none)")
    parser.add_argument("--scaling", action="store_true", help="also run the guard with 1 then 2 workers")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help=f"also run a steady 50%%-rate soak for RSS drift (the target needs {SOAK_TARGET_S})")
    parser.add_argument("--keep", action="store_true", help="keep the bench topics, groups and keys")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--profile-local", type=int, default=0, metavar="RECORDS",
                        help="instead: profile the sanitizer over RECORDS bench events in a loop, no Kafka")
    parser.add_argument("--cprofile-out", type=Path, default=None, help="with --profile-local: cProfile dump")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.profile_local:
            result = profile_local(load_settings(None), args.profile_local, cprofile_out=args.cprofile_out)
            print(render_profile(result))
            if args.json_out is not None:
                args.json_out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        run_bench(load_settings(None), records=args.records, partitions=args.partitions, workers=args.workers,
                  json_out=args.json_out, latency_seconds=args.latency_seconds, scaling=args.scaling,
                  soak_seconds=args.soak, keep=args.keep, trials=args.trials, warmup_seconds=args.warmup_seconds)
    except GuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
