"""The topics, consumer groups and keys a run creates and removes, and filling or pacing its input topic."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from guard.bench.common import BenchError, log
from guard.bench.workload import Workload


# --- topics and groups ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Names:
    """Every topic and group of one run, all carrying `bench<runid>` so cleanup can find them."""

    runid: str

    @property
    def prefix(self) -> str:
        return f"bench{self.runid}"

    def input(self, table: str = "public.customers") -> str:
        """The raw topic of `table` (`schema.table`), named as the connector names it."""
        return f"{self.prefix}.{table}"

    def inputs(self, tables: Iterable[str]) -> list[str]:
        return [self.input(t) for t in tables]

    @property
    def plain_out(self) -> str:
        # Not `<prefix>.plain.out`: that would match the guard's raw pattern `^<prefix>\.[^.]+\.[^.]+$`.
        return f"{self.prefix}-plain.out"

    def sanitized(self, table: str = "public.customers") -> str:
        return f"sanitized.{self.input(table)}"

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


#: The anomalies a guard raises for a write its policy checks did not allow (`Emitter.write_alert`).
WRITE_ALERT_RULES = ("write_unattributed", "write_denied")


def write_alerts(client: dict[str, Any], names: Names, timeout: float = 60) -> dict[str, int]:
    """How many writes the run's guards decided `unattributed` or denied: the `write_unattributed` and
    `write_denied` anomalies committed on the run's anomalies topic (`bench<runid>-guard.anomalies`), read
    with read_committed after every worker stopped. Each such write is alerted once (no deduplication),
    so the counts are decisions, whatever mode or trial made them; a rule never raised counts 0.
    """
    topic = f"{names.prefix}-guard.anomalies"
    counts = dict.fromkeys(WRITE_ALERT_RULES, 0)
    consumer = Consumer({**client, "group.id": names.group("alerts"), "enable.auto.commit": False,
                         "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
    try:
        # Every topic's metadata: asking for one named topic may auto-create it (guard/stack/README.md).
        meta = consumer.list_topics(timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return counts  # no guard raised any anomaly
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while True:
            msgs = consumer.consume(1000, 0.5)
            if msgs:
                idle_since = time.monotonic()
            for msg in msgs:
                value = msg.value()
                if msg.error() is not None or not value or value[:1] != b"{":
                    continue  # only the sanitizer's JSON anomalies are counted
                try:
                    rule = orjson.loads(value).get("rule")
                except orjson.JSONDecodeError:
                    continue
                if rule in counts:
                    counts[rule] += 1
            positions = {tp.partition: tp.offset for tp in consumer.position(
                [TopicPartition(topic, p) for p in ends])}
            filled = [(positions.get(p, -1), end) for p, end in ends.items() if end > 0]
            if all(pos >= end for pos, end in filled):
                return counts
            # A transaction marker may end a partition, and it is never handed out: with every writer
            # stopped, 5 s without a record after a record of every partition was read is the end too.
            if all(pos > 0 for pos, _ in filled) and time.monotonic() - idle_since > 5:
                return counts
            if time.monotonic() > deadline:
                raise BenchError(f"could not read {topic} to its end within {timeout:.0f}s")
    finally:
        consumer.close()


def drift_alert_keys(workload: Workload, tenant: str = "demo-bank") -> list[str]:
    """Redis marks of the drift alerts the bench can raise: one per column the catalog doesn't know.

    The sanitizer deduplicates drift alerts per table and column (not per branch), so the bench's events
    share these marks with the live pipeline; see `cleanup_redis`.
    """
    from guard.classify.catalog import Catalog
    from guard.classify.plans import Classifier
    from guard.keys.store import tenant_prefix

    classifier, keys = Classifier(Catalog.load(None)), []
    first: dict[str, int] = {}
    for n, (table, _, value) in enumerate(workload.templates):
        if value is not None and orjson.loads(workload.value(n, 0) or b"{}").get("after") is not None:
            first.setdefault(table, n)
    for table, n in first.items():
        row = orjson.loads(workload.value(n, 0) or b"{}")["after"]
        keys += [f"{tenant_prefix(tenant)}alerted:drift:{table}:{p.name}"
                 for p in classifier.plan(table, row).unclassified]
    return keys


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


#: A run's name in its topics, groups and keys: `bench` and the eight hex digits of its run id.
_RUN_NAME = re.compile(r"bench([0-9a-f]{8})(?![0-9a-f])")


def cleanup_leftovers(admin: AdminClient, redis_url: str) -> dict[str, int]:
    """Delete every bench run's topics and Redis keys on this stack (`--cleanup`).

    A run removes its own at the end, also when stopped with Ctrl-C or SIGTERM; a run killed with SIGKILL, or
    on a machine that died, leaves them: raw topics holding plaintext, and keys by the hundred thousand that
    every append-only-file rewrite then copies. Only for a stack where no bench is running: a running one's
    are removed too. Its consumer groups are left: they hold offsets only, the bench's principal may not list
    groups, and the broker drops them after its offsets retention (7 days by default). Returns how many runs,
    topics and keys were removed.
    """
    topics = [t for t in admin.list_topics(timeout=10).topics if _RUN_NAME.search(t)]
    runs = sorted({m.group(1) for t in topics if (m := _RUN_NAME.search(t)) is not None})
    removed = {"runs": len(runs), "topics": 0, "keys": 0}
    for runid in runs:
        removed["topics"] += len(cleanup_kafka(admin, Names(runid), []))
    try:
        removed["keys"] = _delete_keys(redis_url, "bg:*:bench" + "[0-9a-f]" * 8 + "*", [])
    except Exception as exc:  # noqa: BLE001 - redis-py's errors and ours alike: say what was left
        raise BenchError(f"removed {removed['topics']} bench topic(s), but not the keys ({type(exc).__name__}); "
                         "check that the stack's Redis runs (guard stack status) and run --cleanup again") from None
    return removed


def _delete_keys(redis_url: str, pattern: str, extra: list[str]) -> int:
    from guard.keys.redis_client import redis_client

    client = redis_client(redis_url)
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
    from guard.keys.redis_client import redis_client

    client = redis_client(redis_url)
    return [k for k in keys if not client.exists(k)]


# --- filling and pacing -----------------------------------------------------------------------------
def _fill_producer(client: dict[str, Any], linger_ms: int, transactional_id: str | None = None) -> Producer:
    """A plain producer like Kafka Connect's (acks=all, Java's murmur2 partitioner, no compression)."""
    return Producer({
        **client,
        **({} if transactional_id is None else {"transactional.id": transactional_id}),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "partitioner": "murmur2_random",
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    })


def _produce(producer: Producer, topic: str, key: bytes, value: bytes | None) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.05)


def fill(client: dict[str, Any], names: Names, workload: Workload, *, transactional_id: str | None = None) -> float:
    """Produce every record of the workload once, each to its table's raw topic (a logical decoding
    message to `<prefix>.message`); returns records/s (not timed against either mode).

    With `transactional_id`, every record is written in one Kafka transaction: read_committed consumers
    (both modes' workers) see none of them until the commit, then all of them at once
    (`guard.bench.gate`)."""
    producer = _fill_producer(client, 20, transactional_id)
    if transactional_id is not None:
        producer.init_transactions(30)
        producer.begin_transaction()
    topics = {table: names.input(table) for table in workload.topics}
    templates = workload.templates
    start = time.monotonic()
    ts_ms = int(time.time() * 1000)
    try:
        for n, template in enumerate(workload.order):
            table, key, _ = templates[template]
            _produce(producer, topics[table], key, workload.value(template, ts_ms))
            if n % 10_000 == 0:
                producer.poll(0)
        if transactional_id is not None:
            producer.commit_transaction(120)  # flushes first; raises if any record was not written
    except BaseException:
        if transactional_id is not None:  # no open transaction left to hold back every reader of the topics
            try:
                producer.abort_transaction(30)
            except KafkaException as exc:
                log.warning("could not abort the fill's transaction (%s); the broker aborts it at its timeout", exc)
        raise
    if transactional_id is None and producer.flush(120) != 0:
        raise BenchError(f"could not write the workload to {names.prefix}'s raw topics")
    return len(workload.order) / (time.monotonic() - start)


def pace(client: dict[str, Any], names: Names, workload: Workload, rate: float, seconds: float,
         check: Callable[[], None] | None = None) -> tuple[int, float]:
    """Send at `rate` events/s for `seconds`, stamping each envelope with its send time.

    Sends `workload.replay` over and over (never a write for a customer who left), each event to its
    table's raw topic. Returns (events sent, achieved rate). Sends in 2 ms ticks so bursts stay far below one batch;
    `check` (e.g. "are the workers still alive?") runs about once a second and may raise to stop early.
    The producer lingers 5 ms, Kafka 4's default and so what Debezium's Connect producer does: the 1 ms
    used before sent several times more produce requests, and that load on the broker and this process
    (all on the same 2 cores as the worker under test) was part of what the latency phase measured. The
    linger counts in the measured latency (the envelope is stamped before it).
    """
    producer = _fill_producer(client, 5)
    order, n_order = workload.replay, len(workload.replay)
    topics = {table: names.input(table) for table in workload.topics}
    templates = workload.templates
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
            table, key, _ = templates[template]
            _produce(producer, topics[table], key, workload.value(template, now_ms))
            sent += 1
        producer.poll(0)
        time.sleep(0.002)
    took = time.monotonic() - start
    producer.flush(30)
    return sent, sent / took
