"""One benchmark worker process: the plain exactly-once loop (`plain`) or the real guard (`guard`).

`guard.bench.run` starts these as separate OS processes so each one's RSS can be measured on its own and so
W workers really run in parallel (no shared GIL). A worker talks to its parent through stdout, one JSON
object per line and nothing else on stdout (logs go to stderr):

- `{"ev": "ready", "pid": ...}` once the clients are built (before the group join);
- `{"ev": "first", "t": <epoch s>, "cpu": <process CPU s>}` when the first record reaches the transform: the
  start of the timed window, so process start-up and the group join are not counted against either mode;
- `{"ev": "commit", "t": <epoch s>, "events": <processed so far>, "cpu": <process CPU s>}` after every
  committed transaction, from which the parent finds the moment the last input record was committed and the
  CPU time (every thread of the process: librdkafka's too) the window cost;
- `{"ev": "done", ...counts}` at exit. Counts only: never keys, values or field contents.

Both modes run the same consumer settings, the same batch policy (Settings.batch_size / batch_ms, commit
when the batch is full, `batch_ms` old, or the topic is idle) and the same exactly-once protocol
(`send_offsets_to_transaction` + `commit_transaction` per batch), so the ratio measures the sanitizer and
not a difference in Kafka plumbing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from guard.config import Settings, load_settings
from guard.kafka.batching import EarlyOffsets, commit_due, take
from guard.kafka.clients import consumer_config, producer_config
from guard.kafka.daemon_calls import DaemonExecutor

log = logging.getLogger("guard.bench_worker")


def emit(event: str, **fields: Any) -> None:
    """Write one protocol line to the parent (flushed at once: the parent timestamps progress from it)."""
    sys.stdout.write(orjson.dumps({"ev": event, **fields}).decode() + "\n")
    sys.stdout.flush()


class PlainLoop:
    """The lean plain loop: the fastest honest exactly-once consume-produce loop we know in Python.

    Values are copied unchanged, each input record to the same partition of the output topic with its
    timestamp, and the batch's offsets are committed inside the transaction: the same consumer and
    producer settings, batch policy and transaction protocol as `SanitizerWorker`. Per record it does what
    must be done and nothing else, in one pass over the batch: one positional `produce` call (the form the
    guard's native path uses; keywords cost a dict per call) and one store of the partition's last offset.
    The offsets are sent to the transaction on a helper thread right after the pass (`EarlyOffsets`), and
    an abort rewinds to the group's committed offsets (asked once, on the rare abort) instead of tracking
    every partition's first offset per record.
    """

    def __init__(self, settings: Settings, input_topics: list[str], output_topic: str) -> None:
        self.settings = settings
        self.input_topics = input_topics
        self.output_topic = output_topic
        self.events = 0
        self.transactions = 0
        self.aborts = 0
        self._running = True
        self._in_txn = False
        self._txn_started = 0.0
        self._txn_records = 0
        self._last: dict[tuple[str, int], int] = {}
        self._early = EarlyOffsets()
        self._txn_pool = DaemonExecutor("bg-txn")
        self._seen_first = False
        self.consumer = Consumer(consumer_config(settings, f"bench-{settings.worker_id}"))
        self.producer = Producer(producer_config(settings, f"bench-{settings.worker_id}"))

    def stop(self, *_: object) -> None:
        self._running = False

    def run(self) -> None:
        """Loop until SIGTERM; commit policy identical to the runner's."""
        self.producer.init_transactions(30)
        self.consumer.subscribe(self.input_topics, on_revoke=self._on_revoke, on_lost=self._on_lost)
        batch_size, batch_s = self.settings.batch_size, self.settings.batch_ms / 1000
        try:
            while self._running:
                limit = max(1, batch_size - self._txn_records) if self._in_txn else batch_size
                msgs, drained = take(self.consumer, limit, 0 if self._in_txn else batch_s)
                if msgs:
                    self._process(msgs)
                if self._in_txn and commit_due(drained=drained, records=self._txn_records, batch_size=batch_size,
                                               age_s=time.monotonic() - self._txn_started, batch_s=batch_s):
                    self._commit()
        finally:
            if self._in_txn:
                try:
                    self._commit()
                except KafkaException:
                    self._abort()
            self.consumer.close()
            self.producer.flush(10)

    def _process(self, msgs: list[Message]) -> None:
        if not self._seen_first:
            self._seen_first = True
            emit("first", t=time.time(), cpu=time.process_time())
        if not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True
            self._txn_started = time.monotonic()
            self._txn_records = 0
        produce, out, last = self.producer.produce, self.output_topic, self._last
        count = 0
        for msg in msgs:
            if msg.error() is not None:
                self._consumer_error(msg)
                continue
            partition = msg.partition()
            produce(out, msg.value(), msg.key(), partition, None, None, msg.timestamp()[1])  # type: ignore[arg-type]
            last[(msg.topic(), partition)] = msg.offset()  # type: ignore[index,assignment]
            count += 1
        self._txn_records += count
        self.events += count
        self._early.send(self._txn_pool, self.producer, self.consumer, dict(last), 30)
        self.producer.poll(0)

    @staticmethod
    def _consumer_error(msg: Message) -> None:
        err = msg.error()
        if err is not None and err.fatal():
            raise KafkaException(err)

    def _commit(self) -> None:
        if not self._last:
            self.producer.abort_transaction(30)
            self._in_txn = False
            return
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in self._last.items()]
        try:
            if not self._early.cover(self._last, 30):
                self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(30)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.txn_requires_abort():
                self._abort()
                return
            raise
        self.transactions += 1
        self._in_txn = False
        self._last.clear()
        emit("commit", t=time.time(), events=self.events, cpu=time.process_time())

    def _abort(self) -> None:
        """Abort and rewind to the group's committed offsets, so the batch is processed again (uncounted)."""
        self._early.settle()
        if self._in_txn:
            self.producer.abort_transaction(30)
        self.aborts += 1
        self.events -= self._txn_records
        assignment = self.consumer.assignment()
        if assignment:
            for tp in self.consumer.committed(assignment, timeout=30):
                # Nothing committed yet: back to where the group starts reading (auto.offset.reset earliest).
                self.consumer.seek(tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
        self._in_txn = False
        self._last.clear()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._in_txn:
            self._commit()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._in_txn:
            self._abort()


def run_plain(settings: Settings, input_topics: list[str], output_topic: str) -> dict[str, Any]:
    """Run the plain loop until SIGTERM and return its counts."""
    loop = PlainLoop(settings, input_topics, output_topic)
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    emit("ready", pid_mode="plain")
    loop.run()
    return {"events": loop.events, "transactions": loop.transactions, "aborts": loop.aborts}


def _mark_first(process: Callable[..., Any], restore: Callable[[Callable[..., Any]], None]) -> Callable[..., Any]:
    """Wrap `Sanitizer.prefetch` once: report the first call's time, then put the original back.

    `prefetch` starts the transform of every fetched batch, on the native and the Python path alike.
    """

    def first(*args: Any) -> Any:
        emit("first", t=time.time(), cpu=time.process_time())
        restore(process)
        return process(*args)

    return first


def run_guard(settings: Settings, trace: Path | None = None) -> dict[str, Any]:
    """Run the real `SanitizerWorker` over the bench's raw topic until SIGTERM and return its counts.

    `trace`: record the worker's activity there (`guard.bench.trace.WorkerTrace`, `--latency-trace`)."""
    from guard.kafka.runner import SanitizerWorker
    from guard.kafka.stats import Stats
    from guard.pipeline.runtime import build_sanitizer

    sanitizer = build_sanitizer(settings)

    def restore(original: Callable[..., Any]) -> None:
        sanitizer.prefetch = original  # type: ignore[method-assign]

    sanitizer.prefetch = _mark_first(sanitizer.prefetch, restore)  # type: ignore[method-assign]

    def counters() -> dict[str, int]:
        return {**sanitizer.keys.counters(), **sanitizer.memo_counters()}

    def on_batch(stats: Stats) -> None:
        emit("commit", t=time.time(), events=stats.events_in, keys=counters(), cpu=time.process_time())

    worker = SanitizerWorker(settings, sanitizer, on_batch=on_batch)
    worker.install_signal_handlers()
    tracer = None
    if trace is not None:
        from guard.bench.trace import WorkerTrace

        tracer = WorkerTrace(trace)
        tracer.install(worker)
    emit("ready", pid_mode="guard")
    try:
        stats = worker.run()
    finally:
        if tracer is not None:
            tracer.close()
    return {
        "events": stats.events_in,
        "transactions": stats.transactions,
        "aborts": stats.aborts,
        "records_out": stats.records_out,
        "decisions": stats.decisions,
        "dlq_reasons": stats.dlq_reasons,
        # Times a partition was held at a delete whose attribution message was not read yet (policy on).
        "attribution_waits": stats.attribution_waits,
        "keys": counters(),
    }


def guard_settings(runid: str, *, bootstrap: str, redis_url: str, group: str, worker_id: str,
                   branch_suffix: str = "", key_cache_ttl: float | None = None) -> Settings:
    """Settings for a bench guard: its own raw prefix, branch (so its keys are separate) and output topics.

    Output topics are named `bench<runid>-guard.*`, which the raw pattern `^bench<runid>\\.[^.]+\\.[^.]+$`
    does not match, so the guard never consumes its own audit records.
    """
    prefix = f"bench{runid}"
    extra: dict[str, Any] = {} if key_cache_ttl is None else {"key_cache_ttl": key_cache_ttl}
    return load_settings(
        None,
        **extra,
        raw_topic_prefix=prefix,
        branch=prefix + branch_suffix,
        group_id=group,
        worker_id=worker_id,
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        audit_topic=f"{prefix}-guard.audit",
        anomalies_topic=f"{prefix}-guard.anomalies",
        deletions_topic=f"{prefix}-guard.deletions",
        dlq_topic=f"{prefix}-guard.dlq",
        # The bench's tables belong to the demo branch of the policy (policy/entities.json), whose tellers
        # may write them and whose manager may delete; the key-store branch stays the bench's own.
        policy_branch="0101",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("plain", "guard", "guard-nopolicy"), required=True,
                        help="guard-nopolicy: the guard with policy checks off (setting policy = off)")
    parser.add_argument("--runid", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--branch-suffix", default="",
                        help="guard mode: appended to the bench branch, so a new trial creates its own keys")
    parser.add_argument("--input-topic", help="plain mode: the raw topics, comma-separated")
    parser.add_argument("--key-cache-ttl", type=float, default=None,
                        help="guard mode: the data-key cache TTL in seconds (default: the guard's)")
    parser.add_argument("--output-topic", help="plain mode: where values are copied")
    parser.add_argument("--trace", type=Path, default=None,
                        help="guard modes: write the worker's activity spans here (guard.bench.trace)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = guard_settings(args.runid, bootstrap=args.bootstrap, redis_url=args.redis_url,
                              branch_suffix=args.branch_suffix, key_cache_ttl=args.key_cache_ttl,
                              group=args.group, worker_id=args.worker_id)
    if args.mode == "plain":
        if not args.input_topic or not args.output_topic:
            raise SystemExit("plain mode needs --input-topic and --output-topic")
        counts = run_plain(settings, args.input_topic.split(","), args.output_topic)
    elif args.mode == "guard-nopolicy":
        counts = run_guard(replace(settings, policy="off"), args.trace)
    else:
        counts = run_guard(settings, args.trace)
    emit("done", **counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
