r"""Helpers for the reliability tests: complete committed reads, a steady producer, exactly-once checks.

The exactly-once check matches outputs to inputs:

- every input record (topic, partition, offset) has exactly one `guard.audit` record with a per-input
  decision (protected / tombstone / dlq / truncate / erased_*; not the "erase" record a delete adds) written
  by one of *this test's* workers
  (other groups sanitize the same raw topics; the audit record names its worker);
- for raw topics the test produced itself, every input key (a unique customer id) has exactly one
  sanitized record, carrying the input's timestamp. Those topics use a raw-topic prefix of their own
  (`rel<id>.public.customers`, guard setting GUARD_RAW_TOPIC_PREFIX), so no other group's guard (other
  tests, other sessions: every guard subscribes to `^br0101\.[^.]+\.[^.]+$`) writes to the same sanitized
  topic or competes for its partitions;
- no sensitive plaintext value appears in the raw bytes (key + value) of any sanitized, audit, DLQ,
  anomaly or deletion record.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from guard.records.codec import decode, write_decision_of
from guard.workload import synth
from tests.integration.kafka_helpers import Rec, high_watermark, kafka_conf
from tests.leak_scanner import LeakScanner, find_leak, sensitive_of

RAW_PREFIX = "br0101"
AUDIT, DLQ, ANOMALIES, DELETIONS = "guard.audit", "guard.dlq", "guard.anomalies", "guard.deletions"
WORKLOAD_TABLES = ("customers", "accounts", "transactions", "customer_auth")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def unstable_partitions(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Partitions whose last stable offset is behind the high watermark, with the gap.

    A gap that outlives every writer's transaction timeout is a *hanging transaction*: `read_committed`
    readers of that partition never get past it.
    """
    meta = _list_all_topics(bootstrap)
    ends: dict[str, dict[tuple[str, int], int]] = {}
    for isolation in ("read_uncommitted", "read_committed"):
        consumer = Consumer({**kafka_conf(bootstrap), "group.id": f"lso-{uuid.uuid4()}",
                             "isolation.level": isolation})
        try:
            ends[isolation] = {(t, p): high_watermark(consumer, t, p)
                               for t in topics if t in meta for p in meta[t].partitions}
        finally:
            consumer.close()
    return {tp: hw - ends["read_committed"][tp] for tp, hw in ends["read_uncommitted"].items()
            if hw > ends["read_committed"][tp]}


def assert_no_hanging_transactions(bootstrap: str, topics: Iterable[str], timeout: float = 90.0) -> None:
    """Every transaction on `topics` ends (commit or abort) within the transaction timeout and clean-up."""
    topics = list(topics)
    try:
        wait_until(lambda: not unstable_partitions(bootstrap, topics), timeout=timeout, interval=3,
                   what="the last stable offsets to reach the high watermarks")
    except AssertionError:
        raise AssertionError(f"hanging transactions (partition: records behind the LSO): "
                             f"{unstable_partitions(bootstrap, topics)}") from None


# --- topics and offsets ---------------------------------------------------------------------------
def _list_all_topics(bootstrap: str) -> dict[str, Any]:
    # Never name a topic in a metadata request: the broker auto-creates it (auto.create.topics.enable).
    return AdminClient(kafka_conf(bootstrap)).list_topics(timeout=15).topics


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient(kafka_conf(bootstrap))
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    wait_until(lambda: topic in _list_all_topics(bootstrap)
               and len(_list_all_topics(bootstrap)[topic].partitions) == partitions,
               timeout=30, what=f"topic {topic}", interval=0.2)


def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """High watermarks of every partition of `topics` that exist (missing topics are left out)."""
    meta = _list_all_topics(bootstrap)
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": unique("rel-probe-")})
    try:
        out = {}
        for topic in topics:
            if topic not in meta or meta[topic].error is not None:
                continue
            for p in meta[topic].partitions:
                out[(topic, p)] = high_watermark(consumer, topic, p)
        return out
    finally:
        consumer.close()


def raw_topics(bootstrap: str) -> list[str]:
    return [t for t in _list_all_topics(bootstrap) if t.startswith(RAW_PREFIX + ".") and t.count(".") == 2]


def position_group_at_end(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """Commit the current end of every existing raw topic for `group`, so its workers skip history."""
    ends = end_offsets(bootstrap, raw_topics(bootstrap))
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
    finally:
        consumer.close()
    return ends


def read_from(bootstrap: str, topic: str, start: dict[tuple[str, int], int] | None = None, *,
              timeout: float = 60.0) -> list[Rec]:
    """Every committed record of `topic` from `start` (per partition; 0 where absent) to its current end.

    Unlike `read_all`, this fails instead of returning a partial read: an open transaction holds the
    read_committed position below the high watermark until it commits or aborts.
    """
    meta = _list_all_topics(bootstrap).get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return []
    consumer = Consumer({**kafka_conf(bootstrap), "group.id": unique("rel-read-"),
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 100})
    try:
        starts = {p: (start or {}).get((topic, p), 0) for p in meta.partitions}
        ends = {p: high_watermark(consumer, topic, p) for p in meta.partitions}
        pending = {p for p in meta.partitions if ends[p] > starts[p]}
        if not pending:
            return []
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in pending])
        out: list[Rec] = []
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout:.0f}s "
                                     f"(partitions {sorted(pending)} held back, e.g. by an open transaction)")
            for msg in consumer.consume(2000, 0.5):
                if msg.error() is None:
                    out.append(Rec(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                   msg.headers(), msg.timestamp()[1]))
            for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        return [r for r in out if r.offset < ends[r.partition]]
    finally:
        consumer.close()


# --- inputs -----------------------------------------------------------------------------------------
_RARE = "龘龗龖齉靐麤鱻燚垚淼驫羴猋"


def customer_row(cid: int, rng: random.Random) -> dict[str, Any]:
    # 2-3 character names can occur by chance inside legitimate masked addresses (a province or district
    # stays visible), so the names here get three rare characters: long enough to scan for safely.
    name = synth.chinese_name(rng) + "".join(rng.choice(_RARE) for _ in range(3))
    return {"customer_id": cid, "name": name, "id_number": synth.resident_id(rng), "mobile": synth.mobile(rng),
            "email": synth.email(rng), "address": synth.address(rng), "gender": rng.choice("MF"),
            "birth_date": rng.randrange(20000), "occupation": "教师", "risk_level": rng.randrange(1, 5),
            "branch_code": "0101", "created_at": "2026-01-01T00:00:00Z"}


def change_event(row: dict[str, Any], *, op: str = "c", table: str = "customers") -> bytes:
    """A Debezium PostgreSQL change event (JSON converter without schemas), like the connector writes."""
    now = int(time.time() * 1000)
    return orjson.dumps({
        "before": None, "after": row,
        "source": {"version": "3.6.1.Final", "connector": "postgresql", "name": RAW_PREFIX, "ts_ms": now,
                   "snapshot": "false", "db": "branch_0101", "schema": "public", "table": table,
                   "txId": 1, "lsn": now, "xmin": None},
        "transaction": None, "op": op, "ts_ms": now,
    })




@dataclass
class Produced:
    cid: int
    partition: int
    offset: int
    timestamp: int


@dataclass
class SteadyProducer:
    """Produces `count` customer inserts into `topic` at about `rate` records/s from a background thread.

    Each record's key is a unique customer id; partitions are used round-robin. Delivery reports give
    each input's partition, offset and timestamp. `count` is a most: `finish()` ends the stream early
    (a test that needs input flowing until its faults are over, not for a fixed time), and `join()` then
    expects every record sent so far to be delivered. Survives a broker restart: librdkafka's idempotent
    producer has been seen to stall for minutes after one while new clients worked at once (once with
    "new leader-1 not found in cache" as the broker shut down: nothing written after it, so a test waiting
    for inputs to be decided saw none for 3 minutes). So the first failed delivery (`message.timeout.ms`)
    retires the producer there and then: its queue is purged, and what failed or was purged is sent again,
    with the rest of the stream, by a fresh one (a line on stdout says so). A timed-out record may still
    have been written, so the checks take the raw topic itself as the list of inputs, not this list.
    """

    bootstrap: str
    topic: str
    count: int
    rate: float
    partitions: int
    first_cid: int = field(default_factory=lambda: random.randrange(10**9, 2 * 10**9))
    produced: list[Produced] = field(default_factory=list)
    sensitive: set[Any] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    resent: int = 0
    planned: int = 0
    _thread: threading.Thread | None = None
    _finish: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SteadyProducer:
        self.planned = self.count
        self._thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)
        self._thread.start()
        return self

    def _producer(self) -> Producer:
        return Producer({**kafka_conf(self.bootstrap), "enable.idempotence": True, "linger.ms": 5,
                         "message.timeout.ms": 45_000, "reconnect.backoff.max.ms": 1000})

    def _run(self) -> None:
        rng = random.Random(self.first_cid)
        rows = [customer_row(self.first_cid + i, rng) for i in range(self.count)]
        failed: list[tuple[int, str]] = []

        def report(index: int) -> Callable[[KafkaError | None, Any], None]:
            def on_delivery(err: KafkaError | None, msg: Any) -> None:
                if err is not None:
                    failed.append((index, str(err)))
                else:
                    self.produced.append(Produced(rows[index]["customer_id"], msg.partition(), msg.offset(),
                                                  msg.timestamp()[1]))
            return on_delivery

        def send(producer: Producer, index: int) -> None:
            row = rows[index]
            self.sensitive |= sensitive_of(row)  # what was sent: the leak scan's cost grows with it
            producer.produce(self.topic, change_event(row), orjson.dumps({"customer_id": row["customer_id"]}),
                             partition=index % self.partitions, on_delivery=report(index))
            producer.poll(0)

        def replaced(stuck: Producer) -> Producer:
            """A fresh producer that has sent again what `stuck` failed to deliver or still held."""
            stuck.purge(in_queue=True, in_flight=True, blocking=False)
            stuck.flush(10)  # every purged record's report (a failure) into `failed`; nothing is left waiting
            retired.append(stuck)  # never destroyed here: destroying a stuck client can block
            retry, failed[:] = sorted({i for i, _ in failed}), []
            print(f"steady producer: {len(retry)} records not delivered ({sorted(reasons)[:2]}); "
                  f"sent again by a fresh producer", flush=True)
            self.resent += len(retry)
            fresh = self._producer()
            for i in retry:
                send(fresh, i)
            return fresh

        reasons: set[str] = set()
        retired: list[Producer] = []
        producer = self._producer()
        t0 = time.monotonic()
        for i in range(self.count):
            if self._finish.is_set():
                self.planned = i
                break
            send(producer, i)
            if failed:
                reasons.update(err for _, err in failed)
                producer = replaced(producer)
            delay = t0 + (i + 1) / self.rate - time.monotonic()
            if delay > 0:
                self._finish.wait(delay)
        producer.flush(90)
        for _ in range(3):
            if not failed:
                break
            retry, failed[:] = [i for i, _ in failed], []
            self.resent += len(retry)
            producer = self._producer()
            for i in retry:
                send(producer, i)
            producer.flush(90)
        self.errors.extend(err for _, err in failed)

    def join(self, timeout: float = 300) -> list[Produced]:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the steady producer did not finish"
        assert not self.errors, f"producer delivery errors after {self.resent} resends: {self.errors[:5]}"
        delivered = {p.cid for p in self.produced}
        assert len(delivered) == self.planned, f"{len(delivered)} of {self.planned} inputs delivered"
        return self.produced

    def finish(self) -> int:
        """End the stream now (the records sent so far still get delivered); returns how many were sent."""
        self._finish.set()
        assert self._thread is not None
        self._thread.join(300)
        return self.planned

    @property
    def sent(self) -> int:
        return len(self.produced)


# --- outputs and checks -----------------------------------------------------------------------------
def audits(bootstrap: str, start: dict[tuple[str, int], int], *, workers: set[str] | None = None,
           topics: set[str] | None = None, audit_topic: str = AUDIT) -> list[tuple[Rec, dict[str, Any]]]:
    """Decoded audit records since `start`, optionally only of `workers` and source `topics`."""
    out = []
    for rec in read_from(bootstrap, audit_topic, start):
        if rec.value is None:
            continue
        doc = decode(rec.value)
        if workers is not None and doc["worker"] not in workers:
            continue
        if topics is not None and doc["source_topic"] not in topics:
            continue
        out.append((rec, doc))
    return out


def per_input_counts(audit: list[tuple[Rec, dict[str, Any]]]) -> Counter[tuple[str, int, int]]:
    """Per-input decisions (protected, tombstone, truncate, dlq, erased_delete, erased_late, ...) by input.

    A delete of a subject's root row has a second audit record at the same source offset, for the erasure
    it triggered (op "erase": shredded / held); that one is not a per-input decision.
    """
    return Counter((d["source_topic"], d["source_partition"], d["source_offset"]) for _, d in audit
                   if d["op"] != "erase" and d["decision"] not in WRITE_DECISIONS)


#: The access-policy decision a write gets besides its sanitization decision (docs/policy.md): in the
#: change's own audit record (format 2, `write_decision_of`); format 1 wrote a second record at the same
#: source offset, which is not a per-input decision. Each is counted on its own (`assert_exactly_once_audit`).
WRITE_DECISIONS = frozenset({"write_allowed", "write_denied", "unattributed"})


def assert_exactly_once_audit(inputs: set[tuple[str, int, int]], audit: list[tuple[Rec, dict[str, Any]]]) -> None:
    counts = per_input_counts(audit)
    missing = sorted(inputs - set(counts))
    duplicated = sorted(k for k, n in counts.items() if n > 1 and k in inputs)
    assert not missing, f"{len(missing)} of {len(inputs)} inputs have no audit decision (LOST), e.g. {missing[:10]}"
    assert not duplicated, (f"{len(duplicated)} inputs were decided more than once (DUPLICATED), e.g. "
                            f"{[(k, counts[k]) for k in duplicated[:10]]}")
    writes = Counter((d["source_topic"], d["source_partition"], d["source_offset"]) for _, d in audit
                     if write_decision_of(d) is not None)
    twice = sorted(k for k, n in writes.items() if n > 1 and k in inputs)
    assert not twice, f"{len(twice)} writes got more than one policy decision, e.g. {twice[:10]}"


def raw_inputs(bootstrap: str, topic: str) -> list[Produced]:
    """The inputs really written to a test's own raw topic (a resent record may be there twice)."""
    return [Produced(orjson.loads(rec.key)["customer_id"], rec.partition, rec.offset, rec.timestamp)
            for rec in read_from(bootstrap, topic) if rec.key is not None]


def assert_sanitized_once(inputs: list[Produced], sanitized: list[Rec]) -> None:
    """Each raw input has exactly one sanitized record, with the input's timestamp.

    Inputs are matched by customer id and timestamp: a record resent after a delivery timeout may be in
    the raw topic twice, and then it must come out twice.
    """
    want = Counter((p.cid, p.timestamp) for p in inputs)
    mine = {p.cid for p in inputs}
    got: Counter[tuple[int, int]] = Counter()
    strangers = 0
    for rec in sanitized:
        assert rec.key is not None
        cid = orjson.loads(rec.key)["customer_id"]
        if cid in mine:
            got[(cid, rec.timestamp)] += 1
        else:
            strangers += 1
    lost = sorted(k for k in want if got[k] < want[k])
    dup = sorted(k for k in got if got[k] > want.get(k, 0))
    assert not lost, (f"{len(lost)} of {len(want)} inputs have no sanitized record with their timestamp "
                      f"(LOST), e.g. {lost[:10]}")
    assert not dup, f"{len(dup)} inputs have extra sanitized records (DUPLICATED), e.g. {dup[:10]}"
    assert not strangers, f"{strangers} sanitized records match no input"
    for rec in sanitized:
        assert rec.value is not None and decode(rec.value)["after"]["sealed"], "an insert was not sealed"


def assert_no_leak(records: Iterable[Rec], values: Iterable[Any]) -> int:
    """Every record's key and value scanned for every form of the values (`tests.leak_scanner`)."""
    records = list(records)
    values = set(values)
    assert LeakScanner.of(values), "nothing to scan for"
    found = find_leak(records, values)
    if found is not None:
        rec = records[found[0]]
        # The values are the workload's synthetic data: naming the form and where it sits says whether it
        # is a leak or a chance match without a rerun.
        blob = (rec.key or b"") + b"\x00" + (rec.value or b"")
        at = blob.find(found[1])
        raise AssertionError(f"plaintext leaked into {rec.topic}[{rec.partition}]@{rec.offset}: {found[1]!r} "
                             f"at byte {at}, in {blob[max(0, at - 40):at + len(found[1]) + 40]!r}")
    return len(records)


def dlq_records(bootstrap: str, start: dict[tuple[str, int], int], topics: set[str], *,
                dlq_topic: str = DLQ) -> list[tuple[Rec, dict]]:
    out = []
    for rec in read_from(bootstrap, dlq_topic, start):
        doc = orjson.loads(rec.value) if rec.value else {}
        if doc.get("source", {}).get("topic") in topics:
            out.append((rec, doc))
    return out


def log_tail(*workers: Any, chars: int = 4000) -> str:
    """The end of each worker's log, without librdkafka's connection chatter (lines starting with %)."""
    def tail(w: Any) -> str:
        lines = [ln for ln in w.log().splitlines() if not ln.startswith("%")]
        return "\n".join(lines)[-chars:]
    return "\n".join(f"--- {w.worker_id} (alive={w.alive()}, log {w.log_path}) ---\n{tail(w)}" for w in workers)
