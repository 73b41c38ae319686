"""Reliability on the real stack: crashes, rebalances, restarts of every service, poison records.

Every test proves, in the `read_committed` view: nothing lost, nothing duplicated, nothing leaked.
Each test runs its own consumer group, positioned at the current end of the existing raw topics, its own
output topics (audit, DLQ, anomalies, deletions and sanitized topics named after the test), so a
failure in one test (say, a hanging transaction after a broker crash) can't fail the next, and (where it
produces its inputs itself) its own raw topic `rel<id>.public.customers`, whose events name
`public.customers` in their source block so the catalog classifies them. See reliability_helpers.py for
how outputs are matched to inputs.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

import guard.stack
from guard.kafka.partitioning import group_offsets_partition
from guard.records.codec import decode
from guard.workload.branch import WorkloadResult, run_workload
from tests.integration.kafka_helpers import GUARD, GuardProcess, kafka_conf, sanitizer_anomalies
from tests.integration.reliability_helpers import (
    WORKLOAD_TABLES,
    SteadyProducer,
    assert_exactly_once_audit,
    assert_no_hanging_transactions,
    assert_no_leak,
    assert_sanitized_once,
    audits,
    change_event,
    create_topic,
    customer_row,
    dlq_records,
    end_offsets,
    log_tail,
    per_input_counts,
    position_group_at_end,
    raw_inputs,
    read_from,
    sensitive_of,
    unique,
    wait_until,
)

pytestmark = pytest.mark.integration

class Scenario:
    """One test's groups, workers, own raw topic and the output offsets before it started.

    Own-topic workers consume `<prefix>.public.customers` under a raw-topic prefix of their own; CDC
    workers consume the Debezium topics `br0101.*` in a group positioned at their current end.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, *, partitions: int = 3) -> None:
        self.env = env
        self.bootstrap = env["GUARD_KAFKA_BOOTSTRAP"]
        self.log_dir = log_dir
        self.group = unique("rel-")
        self.prefix = unique("rel")
        self.topic = f"{self.prefix}.public.customers"
        # Output topics of this test alone. Their names must not match a raw-topic pattern
        # (`^<prefix>\.[^.]+\.[^.]+$`), or the workers would consume their own outputs.
        self.sanitized_prefix = f"sanitized.{self.prefix}."
        self.sanitized = self.sanitized_prefix + self.topic
        self.audit, self.dlq = f"guard.audit.{self.prefix}", f"guard.dlq.{self.prefix}"
        self.anomalies, self.deletions = f"guard.anomalies.{self.prefix}", f"guard.deletions.{self.prefix}"
        self.partitions = partitions
        self.workers: list[GuardProcess] = []
        self.in_process_ids: set[str] = set()
        self.out_start: dict[tuple[str, int], int] = {}  # the output topics are new: read them whole
        self.raw_start: dict[tuple[str, int], int] = {}
        self.cdc_group = ""
        create_topic(self.bootstrap, self.topic, partitions)

    @property
    def output_env(self) -> dict[str, str]:
        """The settings that send a worker's outputs to this test's own topics."""
        return {"GUARD_SANITIZED_PREFIX": self.sanitized_prefix, "GUARD_AUDIT_TOPIC": self.audit,
                "GUARD_DLQ_TOPIC": self.dlq, "GUARD_ANOMALIES_TOPIC": self.anomalies,
                "GUARD_DELETIONS_TOPIC": self.deletions}

    @property
    def outputs(self) -> list[str]:
        return [self.audit, self.dlq, self.anomalies, self.deletions]

    def worker(self, n: int = 1) -> GuardProcess:
        w = GuardProcess(self.env, worker_id=f"{self.group}-w{n}", group_id=self.group, log_dir=self.log_dir,
                         extra_env={"GUARD_RAW_TOPIC_PREFIX": self.prefix, **self.output_env})
        self.workers.append(w)
        return w

    def cdc_worker(self, n: int = 1) -> GuardProcess:
        """A worker on the Debezium topics, its group starting at their current end."""
        if not self.cdc_group:
            self.cdc_group = unique("rel-cdc-")
            self.raw_start = position_group_at_end(self.bootstrap, self.cdc_group)
        w = GuardProcess(self.env, worker_id=f"{self.cdc_group}-w{n}", group_id=self.cdc_group,
                         log_dir=self.log_dir, extra_env=self.output_env)
        self.workers.append(w)
        return w

    def wait_every_raw_record_decided(self, *, timeout: float) -> None:
        """Wait until every record now in the own raw topic is decided. Not the same as the producer's count:
        after a broker kill the producer resends what it never saw acknowledged, and the raw topic holds
        those copies too (each an input of its own), so `wait_decided(count)` can pass with a tail of
        inputs still undecided, and stopping the workers then leaves them LOST."""
        raw = raw_inputs(self.bootstrap, self.topic)
        try:
            self.wait_decided(len(raw), timeout=timeout)
        except AssertionError as exc:
            decided = per_input_counts(self.audits({self.topic}))
            undecided = sorted((p.partition, p.offset) for p in raw
                               if (self.topic, p.partition, p.offset) not in decided)
            raise AssertionError(f"undecided inputs (partition, offset): {undecided[:20]}; the group's committed "
                                 f"offsets {self.committed()}\n{exc}") from None

    @property
    def worker_ids(self) -> set[str]:
        return {w.worker_id for w in self.workers} | self.in_process_ids

    def decided(self, topics: set[str] | None = None) -> int:
        """How many distinct inputs of `topics` (default: the own raw topic) this test's workers decided."""
        return len(per_input_counts(self.audits(topics or {self.topic})))

    def wait_decided(self, n: int, *, timeout: float, topics: set[str] | None = None, strict: bool = True) -> None:
        """Wait until `n` inputs are decided; with strict=False a timeout is left to the exact checks."""
        try:
            wait_until(lambda: self.decided(topics) >= n, timeout=timeout, what=f"{n} inputs decided", interval=2)
        except AssertionError as exc:
            if strict:
                raise AssertionError(f"{exc}; only {self.decided(topics)}\n{log_tail(*self.workers)}") from None
            print(f"{exc}; only {self.decided(topics)}; group offsets {self.committed()}")

    def audits(self, topics: set[str], workers: set[str] | None = None) -> list[tuple[Any, dict[str, Any]]]:
        return audits(self.bootstrap, self.out_start, workers=self.worker_ids if workers is None else workers,
                      topics=topics, audit_topic=self.audit)

    def dlq_records(self, topics: set[str]) -> list[tuple[Any, dict[str, Any]]]:
        return dlq_records(self.bootstrap, self.out_start, topics, dlq_topic=self.dlq)

    def committed(self) -> dict[int, int]:

        c = Consumer({**kafka_conf(self.bootstrap), "group.id": self.group})
        try:
            tps = c.committed([TopicPartition(self.topic, p) for p in range(self.partitions)], timeout=10)
            return {tp.partition: tp.offset for tp in tps}
        finally:
            c.close()

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()

    def kill_all(self) -> None:
        for w in self.workers:
            w.kill()

    def check_own_topic(self, producer: SteadyProducer) -> None:
        """Exactly once and leak-free for the inputs the test produced into its own raw topic."""
        produced = producer.join()
        assert_no_hanging_transactions(self.bootstrap, [*self.outputs, self.sanitized])
        raw = raw_inputs(self.bootstrap, self.topic)
        inputs = {(self.topic, p.partition, p.offset) for p in raw}
        missing = {(self.topic, p.partition, p.offset) for p in produced} - inputs
        assert not missing, f"delivered inputs not in the raw topic: {sorted(missing)[:10]}"
        audit = self.audits({self.topic})
        assert_exactly_once_audit(inputs, audit)
        sanitized = read_from(self.bootstrap, self.sanitized)
        assert_sanitized_once(raw, sanitized)
        dlq = self.dlq_records({self.topic})
        assert not dlq, f"inputs went to the DLQ: {[d['reason'] for _, d in dlq][:10]}"
        others = [r for t in (self.dlq, self.anomalies, self.deletions) for r in read_from(self.bootstrap, t)]
        scanned = assert_no_leak([*sanitized, *(r for r, _ in audit), *others], producer.sensitive)
        assert scanned >= 2 * len(raw)

    def check_raw_inputs(self, topics: set[str], results: list[WorkloadResult]) -> None:
        """Exactly once for every raw record Debezium wrote since the test began, and the workload in it."""
        inputs: set[tuple[str, int, int]] = set()
        seen: set[tuple[int, str]] = set()
        for topic in topics:
            for rec in read_from(self.bootstrap, topic, self.raw_start):
                inputs.add((topic, rec.partition, rec.offset))
                if topic.endswith(".customers") and rec.key:
                    op = orjson.loads(rec.value)["op"] if rec.value else "tombstone"
                    seen.add((orjson.loads(rec.key)["customer_id"], op))
        for res in results:
            want = ({(c, "c") for c in res.customers} | {(c, "u") for c in res.updated}
                    | {(c, "d") for c in res.deleted_customers} | {(c, "tombstone") for c in res.deleted_customers})
            assert want <= seen, f"Debezium lost workload changes: {sorted(want - seen)[:10]}"
        sanitized = [self.sanitized_prefix + t for t in topics]
        assert_no_hanging_transactions(self.bootstrap, [*self.outputs, *sanitized])
        audit = self.audits(topics)
        assert_exactly_once_audit(inputs, audit)
        sensitive = set().union(*(r.sensitive_values for r in results))
        outputs = [r for r, _ in audit]
        for topic in [*sanitized, self.dlq, self.anomalies, self.deletions]:
            outputs += read_from(self.bootstrap, topic)
        assert_no_leak(outputs, sensitive)


def _workload_topics() -> set[str]:
    return {f"br0101.public.{t}" for t in WORKLOAD_TABLES}


def _new_raw(sc: Scenario, topics: set[str]) -> int:
    """Raw records Debezium wrote to `topics` since the CDC group was positioned."""
    return sum(o - sc.raw_start.get(tp, 0) for tp, o in end_offsets(sc.bootstrap, topics).items())


def _workload(env: dict[str, str], customers: int = 3) -> WorkloadResult:
    return run_workload(env["GUARD_BRANCH_DSN"], customers=customers, update=1, delete=1)


def _expected_raw(results: list[WorkloadResult]) -> set[tuple[int, str]]:
    out: set[tuple[int, str]] = set()
    for res in results:
        out |= {(c, "c") for c in res.customers} | {(c, "u") for c in res.updated}
        out |= {(c, "d") for c in res.deleted_customers}
    return out


def _raw_customer_ops(bootstrap: str, start: dict[tuple[str, int], int]) -> set[tuple[int, str]]:
    return {(orjson.loads(r.key)["customer_id"], orjson.loads(r.value)["op"])
            for r in read_from(bootstrap, "br0101.public.customers", start) if r.key and r.value}


def _connector(env: dict[str, str]) -> tuple[str, list[str]]:
    from guard.config import connect_credentials

    with httpx.Client(base_url=env["GUARD_CONNECT_URL"], timeout=10,
                      auth=connect_credentials(env.get("GUARD_CONNECT_CREDENTIALS_FILE"))) as http:
        names = http.get("/connectors").json()
        if not names:  # a restarted worker lists connectors once it has read its config topic again
            return "MISSING", []
        st = http.get(f"/connectors/{names[0]}/status").json()
        return st["connector"]["state"], [t["state"] for t in st["tasks"]]


def _all_services_running() -> bool:
    return all(s.running for s in guard.stack.status())


def _log_dir(request: pytest.FixtureRequest) -> Path:
    """Worker logs outlive pytest's rotated tmp dirs (other sessions run pytest on this machine too)."""
    path = Path(tempfile.gettempdir()) / "branchguard-reliability" / f"{request.node.name}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def log_dir(request: pytest.FixtureRequest) -> Path:
    return _log_dir(request)


@pytest.fixture
def scenario(stack: dict[str, str], log_dir: Path):
    sc = Scenario(stack, log_dir)
    yield sc
    sc.kill_all()
    print(log_tail(*sc.workers, chars=3000))


@pytest.fixture
def restore_stack():
    """Whatever a test stopped or killed runs again afterwards (other tests share the stack)."""
    yield
    if not _all_services_running():
        guard.stack.up()


# --- 1. crash ---------------------------------------------------------------------------------------
def test_kill_9_mid_stream_then_restart_with_the_same_worker_id(scenario: Scenario):
    sc = scenario
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=900, rate=75, partitions=sc.partitions).start()
    sc.wait_decided(50, timeout=60)
    time.sleep(2)
    w1.kill()  # SIGKILL mid-stream: an open transaction with outputs and no committed offsets
    decided_at_kill = sc.decided()
    assert decided_at_kill < 900, "the crash must happen mid-stream"
    time.sleep(1)
    w1b = sc.worker(1).start()  # the same worker id: fences the dead one's transaction at once
    producer.join()
    sc.wait_decided(900, timeout=90)
    assert w1b.alive(), log_tail(w1b)
    sc.stop_all()
    sc.check_own_topic(producer)


# --- 2. rebalance -----------------------------------------------------------------------------------
def test_second_worker_joins_then_leaves_while_input_flows(scenario: Scenario):
    sc = scenario
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=1200, rate=60, partitions=sc.partitions).start()
    sc.wait_decided(30, timeout=60)
    w2 = sc.worker(2).start()
    # w2 must really take partitions over before it leaves
    wait_until(lambda: len(sc.audits({sc.topic}, workers={w2.worker_id})) > 20,
               timeout=60, what="the second worker to process records", interval=2)
    w2.stop()  # SIGTERM: revoke → commit, then leave the group
    assert w2.proc is not None and w2.proc.returncode == 0, log_tail(w2)
    producer.join()
    sc.wait_decided(1200, timeout=90)
    assert w1.alive(), log_tail(w1)
    by_worker = {d["worker"] for _, d in sc.audits({sc.topic})}
    assert by_worker == sc.worker_ids
    sc.stop_all()
    sc.check_own_topic(producer)


# --- 3. service restarts ----------------------------------------------------------------------------
def test_a_stuck_output_partition_is_alerted_once_and_named_by_doctor(scenario: Scenario):
    """Another writer holds a transaction open on the test's audit topic past the guard's transaction
    timeout (as a hanging transaction would): the worker raises one critical alert, readable on another
    partition of the anomalies topic; `guard doctor` names the partition and the abort command and exits
    1; once the transaction ends, doctor passes."""
    sc = scenario
    # The watch's limit: 5 s + an 8-s margin (the default 30 s only makes the test wait longer).
    sc.env = {**sc.env, "GUARD_TRANSACTION_TIMEOUT_MS": "5000", "GUARD_HANGING_MARGIN_S": "8"}
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=5, rate=50, partitions=sc.partitions).start()
    producer.join()
    sc.wait_decided(5, timeout=60)
    blocker = Producer({**kafka_conf(sc.bootstrap), "transactional.id": unique("blocker-"),
                        "transaction.timeout.ms": 600_000})
    blocker.init_transactions(30)
    blocker.begin_transaction()
    blocker.produce(sc.audit, b"not an audit record", partition=0)
    blocker.flush(30)
    try:
        def alerts() -> list[dict[str, Any]]:
            return [d for d in sanitizer_anomalies(read_from(sc.bootstrap, sc.anomalies))
                    if d.get("rule") == "hanging_transaction"]

        wait_until(lambda: alerts(), timeout=120, interval=3, what="the hanging-transaction alert")
        time.sleep(12)  # another watch round: the same finding is not alerted again
        [alert] = alerts()
        assert (alert["topic"], alert["partition"], alert["severity"]) == (sc.audit, 0, "critical")
        assert f"--partition 0 --start-offset {alert['last_stable_offset']}" in alert["suggested_action"]
        env = {**sc.env, **sc.output_env, "GUARD_GROUP_ID": sc.group}
        doctor = subprocess.run([*GUARD, "doctor", "--settle", "5"], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=120)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert f"FAIL  hanging transaction: {sc.audit}[0]" in doctor.stdout
        assert "--start-offset" in doctor.stdout
    finally:
        blocker.abort_transaction(30)
    doctor = subprocess.run([*GUARD, "doctor", "--settle", "5"], env={**os.environ, **sc.env, **sc.output_env},
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert w1.alive(), log_tail(w1)


def test_a_worker_that_cannot_read_its_groups_committed_offsets_says_so_once_then_reads_everything_once(
        scenario: Scenario):
    """Another producer holds offsets for the worker's group in a transaction it leaves open, so the group
    coordinator answers the worker's offset fetch with UNSTABLE_OFFSET_COMMIT (as when it keeps a committed
    transaction's offsets pending, docs/reliability.md): the worker joins, holds its partitions and can't
    start fetching them. Past the limit it raises one critical `partitions_not_fetching` alert naming them
    and the group's `__consumer_offsets` partition, readable while the stall lasts; once the transaction
    ends it reads every input, exactly once, and logs that its partitions are fetched again."""
    sc = scenario
    # The watch's limit: 5 s + an 8-s margin (the default 30 s + 30 s only makes the test wait longer).
    sc.env = {**sc.env, "GUARD_TRANSACTION_TIMEOUT_MS": "5000", "GUARD_HANGING_MARGIN_S": "8"}
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=30, rate=100, partitions=sc.partitions).start()
    producer.join()
    conf = kafka_conf(sc.bootstrap)
    member = Consumer({**conf, "group.id": sc.group})  # only for the group's metadata: never joins
    blocker = Producer({**conf, "transactional.id": unique("blocker-"), "transaction.timeout.ms": 600_000})
    blocker.init_transactions(30)
    blocker.begin_transaction()
    blocker.send_offsets_to_transaction([TopicPartition(sc.topic, p, 0) for p in range(sc.partitions)],
                                        member.consumer_group_metadata(), 30)
    member.close()
    offsets_partitions = len(AdminClient(conf).list_topics(timeout=30).topics["__consumer_offsets"].partitions)
    try:
        w1 = sc.worker(1).start()

        def alerts() -> list[dict[str, Any]]:
            return [d for d in sanitizer_anomalies(read_from(sc.bootstrap, sc.anomalies))
                    if d.get("rule") == "partitions_not_fetching"]

        wait_until(alerts, timeout=150, interval=3, what="the partitions_not_fetching alert")
        time.sleep(8)  # more rounds of the watch: the same stall is not alerted again
        [alert] = alerts()
        assert alert["severity"] == "critical" and alert["group"] == sc.group, alert
        assert sorted(alert["partitions"]) == [f"{sc.topic}[{p}]" for p in range(sc.partitions)], alert
        expected = f"__consumer_offsets[{group_offsets_partition(sc.group, offsets_partitions)}]"
        assert alert["offsets_partition"] == expected and expected in alert["suggested_action"], alert
        assert 13 <= alert["not_fetching_for_s"] < 13 + 10, alert  # seen within a statistics interval and a round
        assert sc.decided() == 0, "a partition was read while its committed offset could not be"
        assert "holds partitions it does not fetch" in w1.log(), log_tail(w1)
        doctor = _doctor({**sc.env, **sc.output_env, "GUARD_GROUP_ID": sc.group, "GUARD_RAW_TOPIC_PREFIX": sc.prefix})
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert f"FAIL  committed offsets of group {sc.group}: not readable" in doctor.stdout, doctor.stdout
        assert f"restart the broker that leads {expected}" in doctor.stdout, doctor.stdout
    finally:
        blocker.abort_transaction(30)
    sc.wait_decided(30, timeout=120)
    wait_until(lambda: "is fetched again, after" in w1.log(), timeout=30, what="the worker to log the fetch resumed")
    doctor = _doctor({**sc.env, **sc.output_env, "GUARD_GROUP_ID": sc.group, "GUARD_RAW_TOPIC_PREFIX": sc.prefix})
    assert f"ok    committed offsets of group {sc.group}: readable ({sc.partitions} raw partitions" in doctor.stdout, \
        doctor.stdout + doctor.stderr
    assert w1.alive(), log_tail(w1)
    sc.stop_all()
    sc.check_own_topic(producer)


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARD, "doctor", "--settle", "5"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def _outage_under_steady_load(sc: Scenario, service: str, *, down_s: float,
                              rate: float) -> tuple[GuardProcess, SteadyProducer]:
    """A worker on the test's own topic while 900 inputs arrive; `service` is killed (SIGKILL) once the
    worker is deciding, and started again `down_s` later. Returns once every input was delivered."""
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=900, rate=rate, partitions=sc.partitions).start()
    sc.wait_decided(30, timeout=60)
    guard.stack.kill(service)
    try:
        time.sleep(down_s)  # records keep arriving while the service is down
    finally:
        guard.stack.start(service)
    producer.join()
    return w1, producer


def test_connect_restart_while_the_branch_db_is_written(scenario: Scenario, restore_stack):
    sc = scenario
    w1 = sc.cdc_worker(1).start()
    results = [_workload(sc.env)]
    during: list[WorkloadResult] = []
    writer = threading.Thread(target=lambda: during.append(_workload(sc.env, customers=4)))
    writer.start()
    guard.stack.restart("connect")
    writer.join(120)
    results += during
    results.append(_workload(sc.env))
    wait_until(lambda: _connector(sc.env) == ("RUNNING", ["RUNNING"]), timeout=120,
               what="the Debezium connector to run again after the Connect restart")
    wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=120,
               what="Debezium to deliver the workload after the Connect restart")
    topics = _workload_topics()
    sc.wait_decided(_new_raw(sc, topics), timeout=90, topics=topics)
    assert w1.alive(), log_tail(w1)
    sc.stop_all()
    sc.check_raw_inputs(topics, results)


def test_redis_outage_pauses_the_guard_without_dlq_loss_or_leak(scenario: Scenario, restore_stack):
    w1, producer = _outage_under_steady_load(scenario, "redis", down_s=5, rate=45)
    scenario.wait_decided(900, timeout=60, strict=False)
    assert "key store unavailable" in w1.log(), "the outage was not noticed"
    assert w1.alive(), log_tail(w1)
    scenario.stop_all()
    scenario.check_own_topic(producer)


def test_postgres_restart_under_the_debezium_connector(scenario: Scenario, restore_stack):
    sc = scenario
    w1 = sc.cdc_worker(1).start()
    results = [_workload(sc.env)]
    guard.stack.restart("postgres")
    results.append(_workload(sc.env))
    recovered = True
    try:
        wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=60,
                   what="Debezium to resume on its own after the PostgreSQL restart")
    except AssertionError:
        recovered = False
    if not recovered:
        # The documented user action: restart the connector and its tasks through the Connect REST API.
        from guard.config import connect_credentials

        with httpx.Client(base_url=sc.env["GUARD_CONNECT_URL"], timeout=30,
                          auth=connect_credentials(sc.env.get("GUARD_CONNECT_CREDENTIALS_FILE"))) as http:
            name = http.get("/connectors").json()[0]
            r = http.post(f"/connectors/{name}/restart", params={"includeTasks": "true"})
            assert r.status_code < 300, r.text
        wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=90,
                   what="Debezium to resume after POST /connectors/<name>/restart?includeTasks=true")
    results.append(_workload(sc.env))
    wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=60,
               what="the workload written after the recovery")
    topics = _workload_topics()
    sc.wait_decided(_new_raw(sc, topics), timeout=90, topics=topics)
    assert w1.alive(), log_tail(w1)
    sc.stop_all()
    sc.check_raw_inputs(topics, results)
    print(f"Debezium recovered on its own after the PostgreSQL restart: {recovered}")


# --- 4. poison records ------------------------------------------------------------------------------
MARKER = "毒丸泄露检测"  # a plaintext marker in every poison record: it must never reach an output


def _poison() -> list[tuple[str, bytes]]:
    src = b'"source": {"schema": "public", "table": "customers", "db": "branch_0101"}'
    m = MARKER.encode()
    return [
        ("invalid_json", b'{"op": "c", "after": {"name": "' + m + b'"'),
        ("wrong_shape", b'["' + m + b'", 1, 2]'),
        ("wrong_shape", b'"' + m + b'"'),
        ("wrong_shape", b"42"),
        ("missing_op", b'{"after": {"customer_id": 1, "name": "' + m + b'"}, ' + src + b"}"),
        ("missing_op", b'{"op": 5, "after": {"name": "' + m + b'"}, ' + src + b"}"),
        ("unknown_op", b'{"op": "zz", "after": {"name": "' + m + b'"}, ' + src + b"}"),
        ("wrong_shape", b'{"op": "c", "after": ["' + m + b'"], ' + src + b"}"),
        ("wrong_shape", b'{"op": "c", "after": null, ' + src + b"}"),
        ("missing_source", b'{"op": "c", "after": {"name": "' + m + b'"}}'),
        ("missing_table", b'{"op": "c", "after": {"name": "' + m + b'"}, "source": {"schema": "public"}}'),
        ("invalid_utf8", b'{"op": "c", "after": {"name": "\xff\xfe' + m + b'"}, ' + src + b"}"),
        ("empty", b""),
    ]


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> list[int]:
    offsets: list[int] = []
    producer = Producer({**kafka_conf(bootstrap), "enable.idempotence": True,
                         "message.max.bytes": 1_000_000})
    for key, value in records:
        producer.produce(topic, value, key, partition=0,
                         on_delivery=lambda err, msg: offsets.append(-1 if err else msg.offset()))
        producer.flush(30)
    assert len(offsets) == len(records) and -1 not in offsets
    return offsets


def _normal_insert() -> tuple[int, set[str], bytes, bytes]:
    cid = random.randrange(10**9, 2 * 10**9)
    row = customer_row(cid, random.Random(cid))
    return cid, sensitive_of(row), orjson.dumps({"customer_id": cid}), change_event(row)


def test_poison_records_go_to_the_dlq_with_reason_and_offset_and_the_guard_keeps_going(stack, log_dir):
    sc = Scenario(stack, log_dir, partitions=1)
    try:
        w1 = sc.worker(1).start()
        poison = _poison()
        cid, sensitive, key, value = _normal_insert()
        offsets = _produce(sc.bootstrap, sc.topic, [(b'{"customer_id": 1}', v) for _, v in poison] + [(key, value)])
        sc.wait_decided(len(offsets), timeout=60)
        assert w1.alive(), log_tail(w1)
        sc.stop_all()
        dlq = {d["source"]["offset"]: (r, d) for r, d in sc.dlq_records({sc.topic})}
        for (reason, raw), offset in zip(poison, offsets[:-1], strict=True):
            assert offset in dlq, f"poison record {reason} at offset {offset} is not in the DLQ"
            rec, doc = dlq[offset]
            assert doc["reason"] == reason, f"offset {offset}: reason {doc['reason']}, expected {reason}"
            assert doc["source"] == {"topic": sc.topic, "partition": 0, "offset": offset}
            assert doc["value_bytes"] == len(raw)
            assert bool(doc["quarantine"]["value"]) == bool(raw), "the DLQ keeps the input, sealed"
        assert len(dlq) == len(poison), "each poison record goes to the DLQ exactly once"
        audit = sc.audits({sc.topic})
        assert_exactly_once_audit({(sc.topic, 0, o) for o in offsets}, audit)
        assert {d["decision"] for _, d in audit if d["source_offset"] in offsets[:-1]} == {"dlq"}
        sanitized = read_from(sc.bootstrap, sc.sanitized)
        assert [orjson.loads(r.key)["customer_id"] for r in sanitized] == [cid], "the normal insert is sanitized"
        assert decode(sanitized[0].value)["after"]["sealed"]
        anomalies = read_from(sc.bootstrap, sc.anomalies)
        assert_no_leak([*sanitized, *(r for r, _ in audit), *(r for r, _ in dlq.values()), *anomalies],
                       {MARKER, *sensitive})
    finally:
        sc.kill_all()


def test_huge_poison_value_goes_to_the_dlq_without_stopping_the_guard(stack, log_dir):
    """A 900 KB record is under the broker's 1 MiB limit, so it reaches the raw topic and the guard."""
    sc = Scenario(stack, log_dir, partitions=1)
    try:
        w1 = sc.worker(1).start()
        filler = (MARKER * 50_000).encode()[:900_000]
        huge_invalid = b'{"op": "c", "after": {"name": "' + filler  # invalid JSON, 900 KB
        cid, sensitive, key, value = _normal_insert()
        offsets = _produce(sc.bootstrap, sc.topic, [(b'{"customer_id": 2}', huge_invalid), (key, value)])
        try:
            sc.wait_decided(2, timeout=60)
        finally:
            alive = w1.alive()
        assert alive, "the guard died on a 900 KB poison record:\n" + log_tail(w1)
        sc.stop_all()
        dlq = sc.dlq_records({sc.topic})
        assert [(d["reason"], d["source"]["offset"]) for _, d in dlq] == [("invalid_json", offsets[0])]
        sanitized = read_from(sc.bootstrap, sc.sanitized)
        assert [orjson.loads(r.key)["customer_id"] for r in sanitized] == [cid]
        anomalies = read_from(sc.bootstrap, sc.anomalies)
        assert_no_leak([*sanitized, *(r for r, _ in dlq), *anomalies], {MARKER, *sensitive})
    finally:
        sc.kill_all()


# --- output layout ----------------------------------------------------------------------------------
def test_sanitized_records_keep_their_input_partition(stack, log_dir):
    """`TopicManager` promises sanitized topics the raw topic's partition count, so keys keep partitions."""
    sc = Scenario(stack, log_dir, partitions=3)
    try:
        sc.worker(1).start()
        producer = SteadyProducer(sc.bootstrap, sc.topic, count=9, rate=50, partitions=3).start()
        produced = producer.join()
        sc.wait_decided(9, timeout=60)
        sc.stop_all()
        sanitized = {orjson.loads(r.key)["customer_id"]: r for r in read_from(sc.bootstrap, sc.sanitized)}
        moved = {p.cid: (p.partition, sanitized[p.cid].partition) for p in produced
                 if sanitized[p.cid].partition != p.partition}
        parts = len(end_offsets(sc.bootstrap, [sc.sanitized]))
        assert not moved, (f"sanitized topic has {parts} partition(s) for a 3-partition raw topic; "
                           f"{len(moved)} of 9 records changed partition (input, output): {moved}")
    finally:
        sc.kill_all()


class _LostReply:
    """The reply of a key-store write that never comes: Redis died after the request was sent."""

    def result(self) -> None:
        from guard.errors import KeyUnavailableError

        raise KeyUnavailableError("key store unreachable (simulated: Redis died before the commit)")

    def drop(self) -> None:
        pass


def _in_process(sc: Scenario, stack: dict[str, str]) -> tuple[Any, Any]:
    """Settings and a sanitizer for a worker run in the test's own process, on the scenario's topics."""
    from guard.config import load_settings
    from guard.pipeline.runtime import build_sanitizer

    settings = load_settings(
        None, kafka_bootstrap=sc.bootstrap, redis_url=stack["GUARD_REDIS_URL"], raw_topic_prefix=sc.prefix,
        group_id=sc.group, worker_id=f"{sc.group}-inproc", sanitized_prefix=sc.sanitized_prefix,
        audit_topic=sc.audit, dlq_topic=sc.dlq, anomalies_topic=sc.anomalies, deletions_topic=sc.deletions)
    sc.in_process_ids.add(settings.worker_id)
    return settings, build_sanitizer(settings)


class _FirstCommitFails:
    """An in-process worker's set-up on the real stack whose first commit-time key-store write fails (the
    activity write `_commit` waits for: `send_subject_activity`'s reply), so the worker aborts its first
    transaction and rewinds."""

    def __init__(self, stack: dict[str, str], log_dir: Path) -> None:
        self.sc = sc = Scenario(stack, log_dir, partitions=1)
        self.settings, self.sanitizer = _in_process(sc, stack)
        store = self.sanitizer.keys.store
        self._real = store.send_subject_activity
        self.calls = 0
        store.send_subject_activity = self._fails_once  # type: ignore[method-assign]

    def _fails_once(self, branch: str, activity: dict) -> Any:
        self.calls += 1
        if self.calls == 1:
            return _LostReply()
        return self._real(branch, activity)


def test_key_store_failure_at_commit_time_is_retried_not_fatal(stack, log_dir):
    """Redis can die between processing a batch and committing it (the activity write `_commit` waits for).

    A real outage hits that window by chance; here the first commit-time call fails, deterministically,
    in an in-process worker on the real stack. Expected: the batch is aborted and retried like any other
    key-store outage; the worker keeps running and every input is decided exactly once.
    """
    from guard.errors import KeyUnavailableError
    from guard.kafka.runner import SanitizerWorker

    setup = _FirstCommitFails(stack, log_dir)
    sc = setup.sc
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=20, rate=200, partitions=1).start()
    producer.join()
    worker = SanitizerWorker(setup.settings, setup.sanitizer)
    try:
        stats = worker.run(until=lambda s: s.events_in >= 20, max_idle_s=20)
    except KeyUnavailableError as exc:
        pytest.fail(f"the worker died on a key-store error at commit time: {exc!r} (calls={setup.calls})")
    assert setup.calls >= 2 and stats.events_in == 20
    sc.check_own_topic(producer)


class _SeekIgnored:
    """A consumer whose `seek()` does nothing, once: what librdkafka was seen to do around a broker restart
    (the fetch went on from where it was). Everything else is the real consumer's."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.ignored: list[tuple[str, int, int]] = []

    def seek(self, tp: Any) -> None:
        if not self.ignored:
            self.ignored.append((tp.topic, tp.partition, tp.offset))
            return
        self._consumer.seek(tp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def test_a_rewind_the_consumer_does_not_carry_out_is_caught_and_nothing_is_lost(stack, log_dir, monkeypatch):
    """An aborted batch is rewound with `seek()`; if the seek does not happen, the records between its target
    and the consumer's position would never be processed again while later ones were committed past them.
    Here the first commit fails (a key-store error: abort and rewind) and the consumer ignores the rewind's
    seek; the worker must notice (the next record fetched is past the ones it went back over, or none comes)
    and resume from the group's committed offsets: every input decided exactly once, none lost."""
    import guard.kafka.rewinds
    from guard.kafka.runner import SanitizerWorker

    monkeypatch.setattr(guard.kafka.rewinds, "CONFIRM_S", 5.0)  # the tail case: no record comes at all
    setup = _FirstCommitFails(stack, log_dir)
    sc = setup.sc
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=40, rate=20, partitions=1).start()
    worker = SanitizerWorker(setup.settings, setup.sanitizer)
    sabotaged = _SeekIgnored(worker.consumer)
    worker.consumer = sabotaged  # type: ignore[assignment]
    stats = worker.run(until=lambda s: s.events_in >= 40, max_idle_s=60)
    producer.join()
    assert sabotaged.ignored, "the rewind's seek was not made"
    assert stats.lost_rewinds >= 1, "the ignored rewind went unnoticed"
    sc.check_own_topic(producer)


class _LeavesItsGroup:
    """A consumer that leaves its group for good once it has handed out `after` records as a member of it,
    and never comes back: what a consumer stuck rejoining after a broker restart looks like from the worker
    (no member id, nothing fetched, no error; docs/reliability.md). The leaving is the real consumer's own
    (`unsubscribe()`, which revokes its partitions at the next poll); everything else is the real consumer's
    too."""

    def __init__(self, consumer: Any, after: int) -> None:
        self._consumer = consumer
        self._after = after
        self.taken = 0
        self.left = False
        #: (whether it had left, the member id it said) at each of the worker's checks
        self.member_ids: list[tuple[bool, str | None]] = []

    def _count(self, n: int) -> None:
        self.taken += n
        # Only once it is a member: the leaving is what is under test, not the joining.
        if not self.left and self.taken >= self._after and self._consumer.memberid():
            self._consumer.unsubscribe()
            self.left = True

    def poll(self, timeout: float) -> Any:
        msg = self._consumer.poll(timeout)
        self._count(msg is not None)
        return msg

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        msgs = self._consumer.consume(num_messages, timeout)
        self._count(len(msgs))
        return msgs

    def memberid(self) -> str | None:
        member_id = self._consumer.memberid()
        self.member_ids.append((self.left, member_id))
        return member_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def test_a_consumer_that_stays_out_of_its_group_is_rebuilt_and_nothing_is_lost(stack, log_dir, monkeypatch):
    """A worker whose consumer is no longer a member of its group, and does not rejoin, fetches nothing and
    reports no error: its partitions' stream would wait as long as the process lives (seen once after a
    broker restart). The worker must notice (no member id for `SESSIONS_WITHOUT_MEMBER_ID` session timeouts,
    here shortened to 7.5 s), rebuild its clients and resume from the committed offsets: every input decided
    exactly once, none lost, none leaked."""
    import guard.kafka.membership
    from guard.kafka.runner import SanitizerWorker

    monkeypatch.setattr(guard.kafka.membership, "SESSIONS_WITHOUT_MEMBER_ID", 0.5)
    sc = Scenario(stack, log_dir, partitions=1)
    settings, sanitizer = _in_process(sc, stack)
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=60, rate=4, partitions=1).start()
    worker = SanitizerWorker(settings, sanitizer)
    stuck = _LeavesItsGroup(worker.consumer, after=10)
    worker.consumer = stuck  # type: ignore[assignment]
    stats = worker.run(until=lambda s: s.events_in >= 60, max_idle_s=60)
    producer.join()
    assert stuck.left, "the consumer never left its group"
    assert stats.events_in == 60, f"the worker decided {stats.events_in} of 60: it stopped when its consumer left"
    assert stuck.member_ids[-1] == (True, None), f"the consumer's member id after leaving: {stuck.member_ids}"
    assert stats.membership_rebuilds == 1, f"rebuilt {stats.membership_rebuilds} times"
    assert worker.consumer is not stuck
    sc.check_own_topic(producer)


def test_a_worker_with_no_topic_to_read_yet_is_not_rebuilt(stack, log_dir, monkeypatch):
    """A consumer whose subscription matches no topic never joins its group (no member id), as a worker deployed
    before Debezium has created its branch's topics: that is waiting, not being stuck. Over twice the shortened
    limit (7.5 s) the worker must not rebuild its clients."""
    import dataclasses

    import guard.kafka.membership
    from guard.kafka.runner import SanitizerWorker

    monkeypatch.setattr(guard.kafka.membership, "SESSIONS_WITHOUT_MEMBER_ID", 0.5)
    sc = Scenario(stack, log_dir, partitions=1)
    settings, sanitizer = _in_process(sc, stack)
    settings = dataclasses.replace(settings, raw_topic_prefix=unique("none"))  # no topic matches it
    worker = SanitizerWorker(settings, sanitizer)
    watched = _LeavesItsGroup(worker.consumer, after=1 << 30)  # records what the worker asks; never leaves
    worker.consumer = watched  # type: ignore[assignment]
    # not `max_idle_s`: the consumer's "subscribed topic not available" errors are records to the idle count
    deadline = time.monotonic() + 17
    stats = worker.run(until=lambda _: time.monotonic() > deadline)
    assert worker.consumer is watched and stats.membership_rebuilds == 0 and stats.aborts == 0, \
        f"rebuilt with nothing to read: {stats}"
    assert len(watched.member_ids) >= 10 and not any(member_id for _, member_id in watched.member_ids), \
        f"the consumer was a member, or was not asked: {watched.member_ids}"


def _native_threads() -> int:
    """Threads of this process, librdkafka's included (Python's `threading` sees only its own)."""
    return len(os.listdir("/proc/self/task"))


def test_producers_replaced_again_and_again_do_not_pile_up(stack, log_dir):
    """While the cluster is unreachable a worker replaces its producer every 30-75 s; each one given up on
    kept its librdkafka threads and connections for as long as the worker lived. Now a few are kept set aside
    and older ones are destroyed in the background: after twelve replacements on the real stack the process
    holds the threads of at most `KEEP` abandoned producers."""
    from guard.kafka.abandoned import KEEP
    from guard.kafka.runner import SanitizerWorker
    from tests.integration.reliability_helpers import wait_until

    sc = Scenario(stack, log_dir, partitions=1)
    settings, sanitizer = _in_process(sc, stack)
    worker = SanitizerWorker(settings, sanitizer)
    worker._txn("init", lambda: worker.producer.init_transactions(10))
    before = _native_threads()
    worker._replace_producer()
    per_producer = _native_threads() - before  # the new producer's threads; the old one is set aside
    worker._replace_producer()
    per_producer = max(per_producer, (_native_threads() - before) // 2)
    assert per_producer >= 2, f"a producer added {per_producer} threads: the count can't tell them apart"
    for _ in range(10):
        worker._replace_producer()
    assert len(worker._abandoned) == KEEP and worker._abandoned.released == 12 - KEEP
    # the threads of the working producer, of the KEEP set aside, and a margin of one producer's
    bound = before + (KEEP + 1) * per_producer
    wait_until(lambda: _native_threads() <= bound, timeout=60, interval=0.5,
               what=f"the released producers' threads to end ({_native_threads()} threads, bound {bound}, "
                    f"{per_producer} per producer, {before} before)")
    worker.producer.flush(5)
    worker.consumer.close()
