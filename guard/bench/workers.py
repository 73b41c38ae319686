"""The measured worker processes (`guard.bench.worker`), their RSS, and the groups' committed progress."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from guard.bench.common import BenchError, log
from guard.bench.stackcpu import StackCpuSampler
from guard.bench.topics import Names
from guard.bench.workload import MESSAGE_TOPIC, Workload
from guard.config import Settings
from guard.kafka_security import client_config, settings_env


# --- worker processes ------------------------------------------------------------------------------
@dataclass
class WorkerProc:
    """One `guard.bench.worker` process and what it reported on stdout."""

    mode: str
    worker_id: str
    popen: subprocess.Popen[str]
    log_path: Path
    first_t: float | None = None
    #: The process's CPU time (all its threads) when the first record reached the transform.
    first_cpu: float | None = None
    commits: list[tuple[float, int]] = field(default_factory=list)
    #: (time, process CPU time) at each commit.
    commit_cpu: list[tuple[float, float]] = field(default_factory=list)
    #: Guard workers: the key manager's counters at each commit (`KeyManager.counters`).
    key_counts: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    #: Where the worker writes its activity spans (`--latency-trace`), else None.
    trace_path: Path | None = None

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
                if "cpu" in msg:
                    self.first_cpu = float(msg["cpu"])
            elif event == "commit":
                self.commits.append((float(msg["t"]), int(msg["events"])))
                if "cpu" in msg:
                    self.commit_cpu.append((float(msg["t"]), float(msg["cpu"])))
                if "keys" in msg:
                    self.key_counts.append((float(msg["t"]), msg["keys"]))
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
    #: CPU of the local stack's processes and of the machine, sampled through the run (`guard.bench.stackcpu`);
    #: None when the bench runs against another broker.
    stack_cpu: StackCpuSampler | None = None
    #: The workload's tables (`schema.table`): one raw topic each.
    tables: list[str] = field(default_factory=lambda: ["public.customers"])
    #: The guard workers' data-key cache TTL (s); None: the guard's default (`Settings.key_cache_ttl`).
    key_cache_ttl: float | None = None
    #: Whether the workload has logical decoding messages on `<prefix>.message` (the attribution of deletes).
    messages: bool = False
    #: `--latency-trace`: guard workers record their activity (`guard.bench.trace`) beside their logs, and
    #: each latency phase's samples and attribution are collected here (mode -> what `measure_latency` found).
    trace: dict[str, Any] | None = None
    #: The workload the input topics were filled with: a drain by several workers writes it again once
    #: their group is formed (`guard.bench.gate`); None: only one-worker drains.
    workload: Workload | None = None
    #: The offsets of the commit markers those transactional writes left, per input partition: the last
    #: offset of a partition may be one, and no consumer's committed position covers it (`GroupProgress`).
    markers: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        """The raw topics the workers read: the tables' and, if there are messages, `<prefix>.message`."""
        return self.names.inputs([*self.tables, MESSAGE_TOPIC] if self.messages else self.tables)

    def inputs_of(self, mode: str) -> list[str]:
        """The raw topics a mode's workers consume and commit: a guard with policy checks off does not
        read `<prefix>.message` (nothing to attribute), the plain loop and the guard read every topic."""
        if mode == "guard-nopolicy":
            return self.names.inputs(self.tables)
        return self.inputs


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
               "--redis-url", ctx.settings.redis_url, "--input-topic", ",".join(ctx.inputs),
               "--output-topic", ctx.names.plain_out, "--branch-suffix", self.branch_suffix]
        if ctx.key_cache_ttl is not None:
            cmd += ["--key-cache-ttl", str(ctx.key_cache_ttl)]
        trace_path = None
        if ctx.trace is not None and self.mode != "plain":
            trace_path = ctx.log_dir / f"{worker_id}.trace.jsonl"
            cmd += ["--trace", str(trace_path)]
        log_path = ctx.log_dir / f"{worker_id}.log"
        with log_path.open("w") as log_file:
            # the workers reach Kafka as this process does (settings from a --config file included)
            env = {**os.environ, **settings_env(ctx.settings)}
            popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1, env=env)
        proc = WorkerProc(self.mode, worker_id, popen, log_path, trace_path=trace_path)
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

    def cpu_seconds(self, end: float) -> float | None:
        """The CPU time the workers spent from their first record to their last commit at or before `end`
        (summed; every thread of each process), or None if a worker did not report it."""
        total = 0.0
        for proc in self.procs:
            last = [cpu for t, cpu in proc.commit_cpu if t <= end + 1e-6]
            if proc.first_cpu is None or not last:
                return None
            total += last[-1] - proc.first_cpu
        return total

    def key_counters(self, end: float) -> dict[str, int]:
        """The guard workers' key counters summed, each worker's as of its last commit at or before `end`."""
        total: dict[str, int] = {}
        for proc in self.procs:
            last = [counts for t, counts in proc.key_counts if t <= end + 1e-6]
            for name, value in (last[-1] if last else {}).items():
                total[name] = total.get(name, 0) + int(value)
        return total

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
    """Reads a group's committed offsets on the input topics without joining the group."""

    def __init__(self, client: dict[str, Any], group: str, topics: list[str], partitions: int,
                 markers: dict[tuple[str, int], int] | None = None) -> None:
        self.topics, self.partitions = topics, partitions
        self.markers = markers if markers is not None else {}
        self.consumer = Consumer({**client, "group.id": group, "enable.auto.commit": False})

    @classmethod
    def of(cls, ctx: BenchContext, workers: WorkerSet) -> GroupProgress:
        """The progress of `workers`' group on the inputs its mode reads."""
        return cls(client_config(ctx.settings), workers.group, ctx.inputs_of(workers.mode), ctx.partitions,
                   ctx.markers)

    def committed(self) -> dict[tuple[str, int], int]:
        tps = [TopicPartition(t, p) for t in self.topics for p in range(self.partitions)]
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in self.consumer.committed(tps, timeout=10)}

    def stable_ends(self) -> dict[tuple[str, int], int]:
        """Per input partition, the end a read_committed client is told: the last stable offset."""
        return {(t, p): self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in self.topics for p in range(self.partitions)}

    def ends(self) -> dict[tuple[str, int], int]:
        """Per input partition, the offset a group that read everything has committed: the end, or the
        offset of the commit marker the bench's last transactional write left there (`guard.bench.gate`)."""
        return {tp: end - 1 if self.markers.get(tp) == end - 1 else end for tp, end in self.stable_ends().items()}

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit `offsets` for the group, which must have no member (a plain offset commit)."""
        self.consumer.commit(offsets=[TopicPartition(t, p, at) for (t, p), at in offsets.items()],
                             asynchronous=False)

    def wait(self, targets: dict[tuple[str, int], int], workers: WorkerSet, timeout: float) -> float:
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
