"""Latency from the database commit (`--db-latency`): commit → raw record readable (Debezium alone) and
commit → sanitized record readable (read_committed), on the local stack's branch database.

A writer inserts `transactions` rows into the branch database at a steady rate, for customers the stack
seeded, committing every 2 ms the rows due since its last commit (`write_paced`). The stack's Debezium
connector turns each row into a raw record (`<prefix>.public.transactions`); a `guard run` worker of the
stack's branch sanitizes it. Two probes read the raw and the sanitized topic (read_committed) from their ends
and, for every record, take the time it became readable minus the **commit time the record carries**: the
envelope's `source.ts_ms`, which the PostgreSQL connector sets from the commit message of the logical
replication stream (the commit record's timestamp, written by PostgreSQL at commit), and which the guard
copies into the sanitized record as `source_ts_ms`. That is the honest start: a column set to
`clock_timestamp()` would be read inside the transaction, before the commit, and add the commit's own duration
to both latencies. Everything runs on one machine, so the database's clock and the probes' clock are the same
clock (millisecond resolution). The difference per record (matched on the source LSN the sanitized record
carries as `position`) is what the guard adds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, KafkaException, TopicPartition

from guard.bench.common import BenchError, log, percentile
from guard.bench.latency import sanitized_head, topic_partitions
from guard.bench.workload import BENCH_PRINCIPAL
from guard.config import Settings
from guard.kafka.batching import take
from guard.kafka_security import client_config
from guard.stack.config import StackConfig
from guard.stack.kafka_auth import DOWNSTREAM_GROUPS
from guard.stack.kafka_auth import client_config as stack_client_config


def sanitized_source(value: bytes) -> tuple[int | None, str]:
    """(`source_ts_ms`, `position`) of a sanitized record, read straight from its Avro bytes
    (`latency.sanitized_head`; `tests/unit/test_bench_probe.py` checks it against the full decoder)."""
    _, source_ts, position = sanitized_head(value)
    return source_ts, position


class CommitProbe:
    """A read_committed consumer from the end of `topic`: readable time minus commit time per record."""

    def __init__(self, client: dict[str, Any], topic: str, parse: Any, group_prefix: str = "bench-commit-") -> None:
        self.parse = parse
        self.samples: dict[str, tuple[float, int]] = {}  # position -> (latency ms, commit ms)
        self.errors = 0
        self._stop = threading.Event()
        self.consumer = Consumer({**client, "group.id": f"{group_prefix}{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 10, "fetch.min.bytes": 1})
        count = topic_partitions(self.consumer, topic, timeout=60)
        self.consumer.assign([TopicPartition(topic, p, self.consumer.get_watermark_offsets(
            TopicPartition(topic, p), timeout=10)[1]) for p in range(count)])
        self._thread = threading.Thread(target=self._run, name=f"probe-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msgs, _ = take(self.consumer, 1000, 0.05)
            now_ms = time.time() * 1000
            for msg in msgs:
                value = msg.value()
                if msg.error() is not None:
                    if not self.errors:  # e.g. not authorised to read the topic: say so once, not silently
                        log.warning("db latency probe of %s: %s", msg.topic(), msg.error())
                    self.errors += 1
                    continue
                if value is None:
                    continue
                try:
                    committed, position = self.parse(value)
                except (ValueError, IndexError, KeyError, TypeError, orjson.JSONDecodeError):
                    continue
                if committed is not None:
                    self.samples[position] = (now_ms - committed, committed)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


def raw_source(value: bytes) -> tuple[int | None, str]:
    source = orjson.loads(value)["source"]
    return source.get("ts_ms"), f"lsn:{source['lsn']}"


@dataclass
class CommitLatency:
    rate_target: float
    rate_achieved: float
    seconds: float
    written: int
    matched: int
    raw_p50_ms: float
    raw_p95_ms: float
    raw_p99_ms: float
    sanitized_p50_ms: float
    sanitized_p95_ms: float
    sanitized_p99_ms: float
    added_p50_ms: float
    added_p95_ms: float
    added_p99_ms: float
    guard_pid: int | None = None
    #: `--latency-trace`: the guard's activity lined up with the rows it added most to (`trace.attribute`
    #: over the interval from the raw record's arrival to the sanitized record's).
    trace: dict[str, Any] | None = None
    #: The writer's transactions, and the most rows one of them held (`write_paced`).
    commits: int = 0
    max_rows_per_commit: int = 0


def _customers(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT customer_id, account_no FROM accounts ORDER BY account_no LIMIT 500").fetchall()
    if not rows:
        raise BenchError("the branch database has no accounts to write transactions for: run `guard stack up`")
    return [(int(c), str(a)) for c, a in rows]


@dataclass
class WriteResult:
    """What the paced writer did: rows, the rate reached, commits, and the largest commit in rows."""
    rows: int
    rate: float
    commits: int
    max_rows_per_commit: int


#: The writer's tick: every tick, the rows due since the last one are committed together.
WRITE_TICK_S = 0.002

_INSERT_DUE = (
    "INSERT INTO transactions (account_no, customer_id, amount, direction, counterparty_name, counterparty_account, "
    "channel, memo) SELECT a, c, m, 'D', 'bench payee', '6222020000000000000', 'mobile', 'bench' "
    "FROM unnest(%s::varchar[], %s::bigint[], %s::numeric[]) AS due(a, c, m)")


def write_paced(dsn: str, rate: float, seconds: float) -> WriteResult:
    """Insert `transactions` rows at `rate` rows/s for `seconds`, committing every `WRITE_TICK_S` the rows due
    since the last commit as one transaction (one `INSERT ... SELECT FROM unnest`).

    A commit per row is bounded by the database's WAL flush: one connection reached ~2,300 commits/s here
    and eight ~4,200, a tenth of half the guard's rate, so the phase measured the guard nearly idle while
    the target names half its maximum rate (docs/benchmark.md, round 26). Several rows per transaction is
    how a busy branch database commits anyway (a posting is a row and its balance update; concurrent
    sessions share WAL flushes), and each row still carries its own LSN and the commit time of the transaction
    it is in (`source.ts_ms`). At low rates a commit holds one or a few rows; after a stall of the database,
    the rows due meanwhile (rate x stall: 16,343 at most in round 26's default run)."""
    accounts = _customers(dsn)
    written = commits = largest = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The attribution contract (docs/policy.md): the trigger stamps `updated_by` from guard.principal.
        # Set once for the session (each autocommit INSERT is its own transaction), so the measured commits
        # carry no extra statement; the guard decides every row `allow`, none `unattributed`.
        conn.execute("SELECT set_config('guard.principal', %s, false)", (BENCH_PRINCIPAL,))

        def commit_due(until: int) -> None:
            nonlocal written, commits, largest
            due = until - written
            if due <= 0:
                return
            picked = [accounts[(written + k) % len(accounts)] for k in range(due)]
            conn.execute(_INSERT_DUE, ([a for _, a in picked], [c for c, _ in picked],
                                       [Decimal((written + k) % 100_000) / 100 for k in range(due)]))
            written, commits, largest = until, commits + 1, max(largest, due)

        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            # A slow commit makes the next one larger, never a backlog: the rows due are written at every tick.
            commit_due(int(elapsed * rate))
            time.sleep(WRITE_TICK_S)
        commit_due(int(seconds * rate))  # the window's last rows: exactly rate x seconds in all
        took = time.monotonic() - start
    return WriteResult(written, written / took, commits, largest)


def start_guard(settings: Settings, log_path: str, trace: Path | None = None) -> subprocess.Popen[bytes]:
    """A `guard run` worker of the stack's branch (its settings from this environment); with `trace`, the
    same worker with its activity traced there (`python -m guard.bench.trace`)."""
    cmd = [sys.executable, "-m", "guard.cli", "run", "--worker-id", "bench-db-latency"]
    if trace is not None:
        cmd = [sys.executable, "-m", "guard.bench.trace", "--out", str(trace), "--worker-id", "bench-db-latency"]
    with open(log_path, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())


def downstream_client(settings: Settings) -> dict[str, Any]:
    """The local stack's `downstream` principal (reads `sanitized.*`), at the bench's bootstrap address."""
    return {**stack_client_config(StackConfig.from_env(), "downstream"), "bootstrap.servers": settings.kafka_bootstrap}


def caught_up(settings: Settings, raw_topic: str, guard: subprocess.Popen[bytes], log_path: str,
              timeout_s: float = 600.0) -> None:
    """Wait until the guard's group has committed `raw_topic` up to its end (as it was when called)."""
    consumer = Consumer({**client_config(settings), "group.id": settings.group_id, "enable.auto.commit": False})
    try:
        count = topic_partitions(consumer, raw_topic, timeout=60)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(raw_topic, p), timeout=10)[1] for p in range(count)}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if guard.poll() is not None:
                raise BenchError(f"guard run exited with {guard.returncode}; see {log_path}")
            try:
                done = consumer.committed([TopicPartition(raw_topic, p) for p in ends], timeout=10)
            except KafkaException:
                done = []
            if done and all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in done):
                return
            time.sleep(1.0)
        raise BenchError(f"the guard did not catch up with {raw_topic} within {timeout_s:.0f} s; see {log_path}")
    finally:
        consumer.close()


def measure_db_latency(settings: Settings, rate: float, seconds: float, *, warmup_s: float = 10.0,
                       log_path: str, trace: dict[str, Any] | None = None) -> CommitLatency:
    """Write at `rate` for `warmup_s` + `seconds`; percentiles of the rows written in the last `seconds`.

    `trace` (`--latency-trace`): the guard's activity is traced and lined up with the time each row spent
    between its raw and its sanitized record; samples, spans and attribution go to `trace["db"]`."""
    raw_topic = f"{settings.raw_topic_prefix}.public.transactions"
    trace_path = Path(log_path).with_suffix(".trace.jsonl") if trace is not None else None
    guard = start_guard(settings, log_path, trace_path)
    raw = sanitized = None
    try:
        # The guard catches up with what the topics hold (an earlier run's rows included) before the probes
        # start from their ends: otherwise the phase measures the backlog, not the guard at this rate.
        caught_up(settings, raw_topic, guard, log_path)
        raw = CommitProbe(client_config(settings), raw_topic, raw_source)
        # The sanitized topic is read as a downstream consumer reads it: the guard's principal may read the raw
        # topics but no sanitized topic but the bench's own (guard/stack/kafka_auth.py), and read as the guard
        # every fetch was refused and the phase matched 0 rows.
        sanitized = CommitProbe(downstream_client(settings), f"sanitized.{raw_topic}", sanitized_source,
                                DOWNSTREAM_GROUPS + "bench-commit-")
        time.sleep(5)
        if guard.poll() is not None:
            raise BenchError(f"guard run exited with {guard.returncode}; see {log_path}")
        since_ms = (time.time() + warmup_s) * 1000
        wrote = write_paced(settings.branch_dsn, rate, warmup_s + seconds)
        written, achieved = wrote.rows, wrote.rate
        # Wait until every row the raw probe saw in the window is sanitized too (or a minute has passed).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen_raw = {p for p, (_, c) in list(raw.samples.items()) if c >= since_ms}
            if seen_raw and seen_raw <= set(sanitized.samples) and len(seen_raw) >= seconds * achieved * 0.95:
                break
            time.sleep(0.5)
    finally:
        for probe in (raw, sanitized):
            if probe is not None:
                probe.close()
        guard.terminate()
        try:
            guard.wait(30)
        except subprocess.TimeoutExpired:
            guard.kill()
    assert raw is not None and sanitized is not None
    spans_until = time.time() * 1000
    raws = {p: lat for p, (lat, c) in raw.samples.items() if c >= since_ms}
    sans = {p: lat for p, (lat, c) in sanitized.samples.items() if c >= since_ms}
    both = sorted(set(raws) & set(sans))
    added = [sans[p] - raws[p] for p in both]
    raw_l, san_l = [raws[p] for p in both], [sans[p] for p in both]
    log.info("db latency: %d rows written (%.0f/s), %d raw, %d sanitized, %d matched", written, achieved,
             len(raws), len(sans), len(both))

    def pct(values: list[float], q: float) -> float:
        return round(percentile(values, q), 1)

    found = None
    if trace is not None and trace_path is not None and both:
        from guard.bench.trace import attribute, read_spans

        # What the guard is answerable for: from the raw record's arrival to the sanitized record's.
        commits = {p: c for p, (_, c) in raw.samples.items()}
        arrived = [commits[p] + raws[p] for p in both]
        spans = read_spans([trace_path], min(arrived) - 2000, spans_until)
        found = attribute(arrived, [max(a, 0.0) for a in added], spans)
        samples = [[a, round(x, 2), round(r, 2)] for a, x, r in zip(arrived, added, raw_l, strict=True)]
        trace["db"] = {"samples": samples, "spans": spans, "attribution": found}
    return CommitLatency(rate, round(achieved, 1), seconds, written, len(both),
                         pct(raw_l, 50), pct(raw_l, 95), pct(raw_l, 99), pct(san_l, 50), pct(san_l, 95),
                         pct(san_l, 99), pct(added, 50), pct(added, 95), pct(added, 99), guard.pid, found,
                         wrote.commits, wrote.max_rows_per_commit)
