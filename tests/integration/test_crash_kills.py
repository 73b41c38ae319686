"""Crashes at moments the test does not choose (issue 13, finding 15): SIGKILL of the guard while one of
its transactions is open (checked), and SIGKILL of the broker, Kafka Connect and PostgreSQL while records
flow and the branch database is written.

`test_reliability.py` keeps its graceful restarts of the broker, Connect and PostgreSQL: a planned
restart is a different path (the broker's controlled shutdown, Connect stopping its task and committing
its source offsets, PostgreSQL's shutdown checkpoint), and the commonest one in operation. A crash skips
all of that: Connect replays from its last committed offsets, PostgreSQL recovers from its WAL and the
replication slot may move back, the broker's transaction coordinator and the group coordinator vanish
without a word. The tests here are the crash variants of those restarts, with the same checks after each:
nothing lost, nothing duplicated, nothing leaked (`Scenario.check_own_topic`, `Scenario.check_raw_inputs`)
and no hanging transaction on any output partition.

Each test kills once (the broker test three times), after a random delay under load, and prints the delay
(and the downtime) it drew, so a failure can be read against the services' logs.
"""

from __future__ import annotations

import random
import threading
import time
from typing import ClassVar

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

import guard.stack
from guard.workload.branch import WorkloadResult, run_workload
from tests.integration.kafka_helpers import GuardProcess, high_watermark, kafka_conf
from tests.integration.reliability_helpers import (
    SteadyProducer,
    assert_no_hanging_transactions,
    end_offsets,
    log_tail,
    unique,
    wait_until,
)
from tests.integration.test_reliability import (
    Scenario,
    _all_services_running,
    _connector,
    _expected_raw,
    _log_dir,
    _new_raw,
    _raw_customer_ops,
    _workload,
    _workload_topics,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def scenario(stack: dict[str, str], request: pytest.FixtureRequest):
    sc = Scenario(stack, _log_dir(request))
    yield sc
    sc.kill_all()
    # A restarted worker keeps its id and so its log file: show each log once.
    print(log_tail(*{w.log_path: w for w in sc.workers}.values(), chars=3000))


@pytest.fixture
def restore_stack():
    """Whatever a test killed runs again afterwards (other tests share the stack)."""
    yield
    if not _all_services_running():
        guard.stack.up()


class BranchWriter:
    """Runs the branch workload again and again in a thread until stopped, so the branch database is being
    written (and Debezium is streaming) whenever the test kills a service.

    A run that fails (PostgreSQL killed under it) is counted, not recorded: which of its statements
    committed is unknown. Every raw record Debezium wrote is checked all the same (`check_raw_inputs`
    takes the raw topics as the list of inputs); only the expectations and the leak scan's values come
    from the runs that completed.
    """

    #: Writers started and not stopped yet: a test that fails before its `stop()` leaves its writer to
    #: `_no_writer_outlives_its_test`.
    running: ClassVar[set[BranchWriter]] = set()

    def __init__(self, dsn: str, *, customers: int = 2, pause_s: float = 1.0) -> None:
        self.dsn = dsn
        self.customers = customers
        self.pause_s = pause_s
        self.results: list[WorkloadResult] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="branch-writer", daemon=True)

    def start(self) -> BranchWriter:
        self._thread.start()
        BranchWriter.running.add(self)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(run_workload(self.dsn, customers=self.customers, update=1, delete=1))
            except psycopg.Error as exc:
                self.failed.append(type(exc).__name__)
                self._stop.wait(1.0)
            else:
                self._stop.wait(self.pause_s)

    def wait_runs(self, n: int, *, timeout: float) -> None:
        """Wait until `n` more runs than now have completed."""
        want = len(self.results) + n
        wait_until(lambda: len(self.results) >= want, timeout=timeout, interval=0.5,
                   what=f"{n} more completed workload runs (failed so far: {self.failed})")

    def stop(self) -> list[WorkloadResult]:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the branch writer did not stop"
        BranchWriter.running.discard(self)
        return self.results


@pytest.fixture(autouse=True)
def _no_writer_outlives_its_test():
    """Stop the branch writers a failed test left running. The branch database and its Debezium topics are
    the whole suite's: a writer left running (a daemon thread, alive until the session ends) made every
    later test that reads them see rows it did not write, so one failure of the broker-outage test became
    six in a CI rehearsal (2026-12-06: "LOST" inputs at the partitions' ends, "a sanitized row of a customer
    the workload did not write")."""
    yield
    for writer in list(BranchWriter.running):
        writer.stop()


class OpenTransactions:
    """Which of a set of partitions hold an open transaction now: last stable offset < high watermark.

    Two long-lived consumers, one per isolation level, ask the partition leader for the end offsets
    (ListOffsets: the high watermark for read_uncommitted, the last stable offset for read_committed).
    The high watermark is read first: a last stable offset below a high watermark seen *before* it means a
    transaction was still open when the last stable offset was read.
    """

    def __init__(self, bootstrap: str, partitions: list[tuple[str, int]]) -> None:
        self.partitions = partitions
        self._hw = Consumer({**kafka_conf(bootstrap), "group.id": unique("probe-hw-"),
                             "isolation.level": "read_uncommitted"})
        self._lso = Consumer({**kafka_conf(bootstrap), "group.id": unique("probe-lso-"),
                              "isolation.level": "read_committed"})

    def now(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(topic, partition) → (last stable offset, high watermark) of each partition with an open transaction."""
        out = {}
        for topic, partition in self.partitions:
            hw = high_watermark(self._hw, topic, partition)
            lso = int(self._lso.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
            if lso < hw:
                out[(topic, partition)] = (lso, hw)
        return out

    def close(self) -> None:
        self._hw.close()
        self._lso.close()


def _partitions(bootstrap: str, topics: list[str]) -> list[tuple[str, int]]:
    return sorted(end_offsets(bootstrap, topics))


# --- the guard ---------------------------------------------------------------------------------------
def test_guard_killed_while_its_transaction_is_open(scenario: Scenario):
    """SIGKILL the worker when one of its transactions is open, checked: its output partitions' last
    stable offset is behind their high watermark when the kill is sent, and still is 3 s after it, with
    the worker dead. Only that worker writes to the test's own output topics and its process is gone, so
    the transaction was open at the kill and never committed (a commit the coordinator had accepted would
    have written its markers within milliseconds). The restarted worker (same id) must fence it: the
    transaction is aborted long before the transaction timeout would have done it, its records are never
    visible to read_committed readers, and every input is decided exactly once.

    Not the same as `test_kill_9_mid_stream_then_restart_with_the_same_worker_id`, which kills at a chosen
    moment without knowing whether a transaction was open then.
    """
    sc = scenario
    timeout_ms = 60_000  # the fence must beat this by far: the successor starts 3 s after the kill
    sc.env = {**sc.env, "GUARD_TRANSACTION_TIMEOUT_MS": str(timeout_ms)}
    rng = random.Random()
    count = 2400  # 30 s at 80/s: still flowing through three attempts (each at most ~10 s)
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=count, rate=80, partitions=sc.partitions).start()
    sc.wait_decided(30, timeout=60)
    probe = OpenTransactions(sc.bootstrap, _partitions(sc.bootstrap, [sc.sanitized, sc.audit]))
    worker: GuardProcess = w1
    witnessed: dict[tuple[str, int], tuple[int, int]] = {}
    attempts: list[str] = []
    try:
        for attempt in range(3):
            delay = rng.uniform(0.2, 3.0)
            time.sleep(delay)  # then the first moment a transaction is seen open: not chosen by the test
            deadline = time.monotonic() + 30
            while not probe.now():
                assert time.monotonic() < deadline and producer.sent < count, (
                    "no open transaction seen under load; " + "; ".join(attempts))
            worker.kill()
            killed_at = time.monotonic()
            sent_at_kill = producer.sent  # (the audit topic can't be read to its end while it is open)
            time.sleep(3)
            witnessed = probe.now()
            attempts.append(f"attempt {attempt + 1}: delay {delay:.2f}s, open after the kill: {witnessed}")
            worker = sc.worker(1).start()  # the same worker id: fences the dead one's transaction
            if witnessed:
                break
        print("\n".join(attempts))
        assert witnessed, ("the kill never met an open transaction (each time it hit the commit): "
                           + "; ".join(attempts))
        assert sent_at_kill < count, "the crash must happen mid-stream"
        # The successor aborts the transaction at init_transactions(): the last stable offset moves past
        # the records the dead worker had written, long before the transaction timeout.
        wait_until(lambda: all(probe.now().get(tp, (hw, hw))[0] >= hw for tp, (_, hw) in witnessed.items()),
                   timeout=timeout_ms / 1000 - 10, interval=0.5,
                   what="the restarted worker to abort its predecessor's open transaction")
        print(f"open transaction aborted {time.monotonic() - killed_at:.1f}s after the kill")
    finally:
        probe.close()
    # The successor decides what the stream brought on after the abort, then the stream ends (it was sized
    # to flow through three attempts; waiting out the rest of it proved nothing more).
    sc.wait_decided(min(sc.decided() + 40, producer.sent), timeout=120)
    sent = producer.finish()
    producer.join()
    sc.wait_decided(sent, timeout=120)
    assert worker.alive(), log_tail(worker)
    sc.stop_all()
    sc.check_own_topic(producer)


# --- the broker --------------------------------------------------------------------------------------
def test_broker_restarted_and_killed_while_the_guard_and_debezium_run(scenario: Scenario, restore_stack):
    """Three broker outages at unplanned moments, in random order: a graceful restart (the broker's
    controlled shutdown: the commonest outage in operation) and two SIGKILLs (downtimes 0.5 s and 4 s),
    while an own-topic worker decides a steady stream and a CDC worker follows Debezium, which streams a
    branch database written throughout. Debezium's producer, Connect's group, the guard's transactions and
    its group coordinator lose the broker; after a kill without warning. Every outage outlasts the
    consumer's 15-s group session (a crashed broker starts only once the controller has fenced its dead
    incarnation, 9 s and more, and takes 10-20 s to answer), so partitions are lost each time and the
    producer's transaction can't finish. Afterwards: the workers are alive and were never restarted, every
    output partition and the group's `__consumer_offsets` partition are readable to the end by
    `read_committed` consumers (no hanging transaction), and nothing is lost, doubled or leaked.

    It is also issue 18's reproduction: on the combined broker+controller node, repeated kills left a
    transaction open forever on every output partition and on `__consumer_offsets` in the first of three
    runs (docs/reliability.md, "Hanging transactions").
    """
    sc = scenario
    rng = random.Random()
    t0 = time.monotonic()

    def phase(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)

    w1 = sc.worker(1).start()
    cdc = sc.cdc_worker(1).start()
    # Input flows until the last outage is over (`finish`): 6,000 records would take 5 minutes.
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=6000, rate=20, partitions=sc.partitions).start()
    sc.wait_decided(30, timeout=60)
    writer = BranchWriter(sc.env["GUARD_BRANCH_DSN"]).start()
    writer.wait_runs(1, timeout=60)
    for outage, down_s in rng.sample([("restart", 0.0), ("kill", 0.5), ("kill", 4.0)], 3):
        delay = rng.uniform(0.2, 4.0)  # mid-transaction, mid-commit or between: not chosen
        time.sleep(delay)
        if outage == "restart":
            guard.stack.restart("broker")
        else:
            guard.stack.kill("broker")
            try:
                time.sleep(down_s)
            finally:
                guard.stack.start("broker")  # waits until the controller has fenced the dead incarnation
        phase(f"broker {outage} {delay:.2f}s after the last outage, down {down_s:.1f}s (+ the fencing wait)")
        # Both workers decide again after each outage, and the branch database is written again.
        sc.wait_decided(sc.decided() + 20, timeout=180)
        writer.wait_runs(1, timeout=120)
        phase("deciding and written again")
    sent = producer.finish()
    results = writer.stop()
    results.append(_workload(sc.env))
    assert sent < 6000, "the stream must still flow when the last outage is over"
    sc.wait_every_raw_record_decided(timeout=180)  # the raw topic may hold resent copies
    phase(f"all {sent} own inputs decided")
    wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=120,
               what="Debezium to deliver the workload after the broker outages")
    topics = _workload_topics()
    sc.wait_decided(_new_raw(sc, topics), timeout=120, topics=topics)
    phase("every raw record Debezium wrote decided")
    assert w1.alive() and cdc.alive(), log_tail(w1, cdc)
    # A stop request is honoured after the outages too: a worker that had given up on a stuck transactional
    # call used to checkpoint, print its stats and then hang at exit until killed (guard.kafka.daemon_calls).
    # The bound catches a hang, it measures nothing: a clean stop may wait out a final commit's deadlines.
    for w in (w1, cdc):
        stopping = time.monotonic()
        assert w.stop(timeout=300), f"{w.worker_id} did not exit on SIGTERM\n{log_tail(w)}"
        phase(f"{w.worker_id} stopped on SIGTERM in {time.monotonic() - stopping:.1f}s")
        assert w.proc is not None and w.proc.returncode == 0, log_tail(w)
    assert_no_hanging_transactions(sc.bootstrap, [*sc.outputs, sc.sanitized, "__consumer_offsets"])
    for w in (w1, cdc):
        assert "hanging transaction" not in w.log(), log_tail(w)
    sc.check_own_topic(producer)
    phase("own topic checked")
    sc.check_raw_inputs(topics, results)
    phase("raw inputs checked")


# --- Kafka Connect -----------------------------------------------------------------------------------
def test_connect_sigkill_while_the_branch_db_is_written(scenario: Scenario, restore_stack):
    """The crash variant of `test_connect_restart_while_the_branch_db_is_written`: Connect dies without
    stopping its task or committing its source offsets, so Debezium replays from its last committed
    offsets; every raw record it writes, the replays included, is decided exactly once."""
    sc = scenario
    rng = random.Random()
    w1 = sc.cdc_worker(1).start()
    writer = BranchWriter(sc.env["GUARD_BRANCH_DSN"]).start()
    writer.wait_runs(1, timeout=60)
    delay, down = rng.uniform(0.0, 4.0), rng.uniform(0.5, 3.0)
    time.sleep(delay)
    guard.stack.kill("connect")
    try:
        time.sleep(down)
    finally:
        guard.stack.start("connect")
    print(f"Connect killed {delay:.2f}s into the writes, started again after {down:.2f}s")
    wait_until(lambda: _connector_running(sc.env), timeout=120,
               what="the Debezium connector to run again after the Connect crash")
    writer.wait_runs(1, timeout=60)
    results = writer.stop()
    results.append(_workload(sc.env))
    wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=120,
               what="Debezium to deliver the workload after the Connect crash")
    topics = _workload_topics()
    sc.wait_decided(_new_raw(sc, topics), timeout=120, topics=topics)
    assert w1.alive(), log_tail(w1)
    sc.stop_all()
    sc.check_raw_inputs(topics, results)


def _connector_running(env: dict[str, str]) -> bool:
    """Connector and task RUNNING; False while Connect is still loading its configuration after a crash."""
    try:
        return _connector(env) == ("RUNNING", ["RUNNING"])
    except (httpx.HTTPError, IndexError, KeyError, ValueError):
        return False


# --- PostgreSQL --------------------------------------------------------------------------------------
def _restart_connector(env: dict[str, str]) -> None:
    """The documented user action: restart the connector and its tasks through the Connect REST API."""
    from guard.config import connect_credentials

    with httpx.Client(base_url=env["GUARD_CONNECT_URL"], timeout=30,
                      auth=connect_credentials(env.get("GUARD_CONNECT_CREDENTIALS_FILE"))) as http:
        name = http.get("/connectors").json()[0]
        r = http.post(f"/connectors/{name}/restart", params={"includeTasks": "true"})
        assert r.status_code < 300, r.text


def test_postgres_sigkill_under_the_debezium_connector(scenario: Scenario, restore_stack):
    """The crash variant of `test_postgres_restart_under_the_debezium_connector`: PostgreSQL is SIGKILLed
    while the workload writes (a run can die mid-transaction) and recovers from its WAL; Debezium's
    replication connection breaks without a shutdown. If Debezium does not resume on its own within 60 s,
    the connector is restarted as documented; either way every committed change reaches the guard and
    is decided exactly once."""
    sc = scenario
    rng = random.Random()
    w1 = sc.cdc_worker(1).start()
    writer = BranchWriter(sc.env["GUARD_BRANCH_DSN"], pause_s=0.5).start()
    writer.wait_runs(1, timeout=60)
    delay, down = rng.uniform(0.0, 3.0), rng.uniform(0.5, 3.0)
    time.sleep(delay)
    guard.stack.kill("postgres")
    try:
        time.sleep(down)
    finally:
        guard.stack.start("postgres")
    writer.wait_runs(1, timeout=90)
    results = writer.stop()
    print(f"PostgreSQL killed {delay:.2f}s into the writes, started again after {down:.2f}s; "
          f"{len(results)} workload runs completed, {len(writer.failed)} failed: {writer.failed}")
    recovered = True
    try:
        wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=60,
                   what="Debezium to resume on its own after the PostgreSQL crash")
    except AssertionError:
        recovered = False
    if not recovered:
        _restart_connector(sc.env)
        wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=90,
                   what="Debezium to resume after POST /connectors/<name>/restart?includeTasks=true")
    results.append(_workload(sc.env))
    wait_until(lambda: _expected_raw(results) <= _raw_customer_ops(sc.bootstrap, sc.raw_start), timeout=60,
               what="the workload written after the recovery")
    topics = _workload_topics()
    sc.wait_decided(_new_raw(sc, topics), timeout=120, topics=topics)
    assert w1.alive(), log_tail(w1)
    sc.stop_all()
    sc.check_raw_inputs(topics, results)
    print(f"Debezium recovered on its own after the PostgreSQL crash: {recovered}")
