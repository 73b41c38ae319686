"""`guard bench` on the local stack: it measures both modes and reports in the documented format.

Timing targets (30% of plain, p99, RSS drift, scaling) are checked by the benchmark itself, never here:
a test that asserts a speed on a shared 2-core machine fails for reasons that have nothing to do with the
code. This test only proves the bench runs end to end and its output is machine-readable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kafka_helpers import kafka_conf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_bench_measures_both_modes(stack: dict[str, str], tmp_path: Path) -> None:
    json_out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "guard.cli", "bench", "--records", "20000", "--customers", "20000", "--partitions", "2",
         "--workers", "1", "--warmup-seconds", "1", "--json-out", str(json_out)],
        cwd=REPO, env={**os.environ, **stack}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.rstrip("\n").splitlines()

    assert re.fullmatch(r"ratio \d+\.\d{3}", lines[-1]), lines[-1]
    assert any(re.match(r"mode\s+workers\s+events/s\s+us/event\s+CPU us/ev\s+p50 ms\s+p99 ms\s+peak RSS MiB\s+key hits"
                        r"\s+store trips/ev\s+of them keys\s+new keys/ev\s+memo hits", line) for line in lines)
    for mode in ("plain ", "guard ", "guard first sight "):
        assert any(line.startswith(mode) for line in lines), mode

    printed = json.loads(proc.stdout.split("\nJSON:\n", 1)[1].rsplit("\nratio ", 1)[0])
    written = json.loads(json_out.read_text())
    assert printed == written
    for mode in ("plain", "guard", "guard_first_sight"):
        result = written["modes"][mode]
        assert result["events_per_s"] > 0
        assert result["events"] >= 20000
        assert result["us_per_event"] == pytest.approx(1e6 / result["events_per_s"], rel=1e-2)
        # The workers' own CPU time over the window (all their threads), per event: measured, not derived.
        assert result["cpu_us_per_event"] > 0
    assert any(line.startswith("CPU per event (us, worker processes, all threads; trials): plain ") for line in lines)
    for mode in ("plain", "guard"):
        result = written["modes"][mode]
        assert result["latency"]["samples"] > 0
        assert 0 <= result["latency"]["probe_ready_s"] < 10, "the probe was fetching before the pacer started"
        assert result["peak_rss_mib"] > 0
    assert f"{written['ratio']:.3f}" == lines[-1].split()[1]
    # A warm-up of 1 s still runs one whole untimed round (a plain and a guard drain) before the trials.
    warmup = written["warmup"]
    assert len(warmup["plain_events_per_s"]) == len(warmup["guard_events_per_s"]) == 1
    assert warmup["seconds"] >= 1 and all(v > 0 for v in warmup["plain_events_per_s"] + warmup["guard_events_per_s"])
    assert any(line.startswith("warm-up before the trials (untimed): ") for line in lines)
    # Three alternating trials per mode by default; each mode's figure is its median trial.
    trials = written["trials"]
    assert written["trials_per_mode"] == len(trials["plain_events_per_s"]) == len(trials["guard_events_per_s"]) == 3
    assert len(trials["guard_first_sight_events_per_s"]) == 3
    for mode in ("plain", "guard", "guard_first_sight"):
        assert written["modes"][mode]["events_per_s"] == sorted(trials[f"{mode}_events_per_s"])[1]
        assert len(trials["cpu_us_per_event"][mode]) == 3 and all(v > 0 for v in trials["cpu_us_per_event"][mode])
        assert written["modes"][mode]["cpu_us_per_event"] in trials["cpu_us_per_event"][mode]
    medians = written["modes"]["guard"]["events_per_s"] / written["modes"]["plain"]["events_per_s"]
    assert written["ratio"] == pytest.approx(medians, rel=1e-3)
    first = written["modes"]["guard_first_sight"]["events_per_s"] / written["modes"]["plain"]["events_per_s"]
    assert written["ratio_first_sight"] == pytest.approx(first, rel=1e-3)
    assert {t["status"] for t in written["targets"]} <= {"pass", "fail", "n/a", "not run"}
    assert written["machine"]["cores"] >= 1
    # Against the local stack the bench knows its broker: how long it has been up, and its stop-the-world
    # pauses in each latency phase (a list, empty if the broker did not collect), summed up in the text.
    assert written["machine"]["broker_uptime_s_at_start"] > 0
    for mode in ("plain", "guard"):
        pauses = written["modes"][mode]["latency"]["broker_gc_pauses"]
        assert isinstance(pauses, list) and all(len(p) == 2 and p[1] >= 0 for p in pauses)
    assert any(line.startswith("broker GC pauses in the latency phases (local stack): guard ") for line in lines)

    # The realistic workload: every table of the demo schema, a population of which the window drew some.
    workload = written["workload"]
    assert workload["kind"] == "realistic" and workload["customers"] == 20000
    assert workload["tables"] == ["public.customers", "public.accounts", "public.transactions", "public.customer_auth"]
    assert all(sum(ops.values()) > 0 for ops in workload["events"].values())
    assert sum(sum(ops.values()) for ops in workload["events"].values()) == 20000
    assert 0 < workload["distinct_customers"] < 20000 + workload["customers_created"]
    assert workload["customers_leaving"] > 0 and workload["key_cache_ttl_s"] == 10.0

    # First sight: a fresh branch, so each distinct customer's key is created once, with the batch's keys
    # fetched in one round trip (far fewer round trips than keys); every event protected or a tombstone.
    first_worker = written["modes"]["guard_first_sight"]["workers"][0]
    assert set(first_worker["decisions"]) <= {"protected", "tombstone", "attribution"}
    assert sum(first_worker["decisions"].values()) == first_worker["events"] and first_worker["dlq_reasons"] == {}
    # Every delete's transaction has its guard.principal message on <prefix>.message, read by the guard
    # (policy on), each recorded as an attribution.
    assert first_worker["decisions"]["attribution"] == workload["events"]["message"]["m"] > 0
    keys = written["modes"]["guard_first_sight"]["keys"]
    assert keys["keys_created"] == workload["distinct_customers"] <= keys["keys_fetched"]
    assert keys["store_round_trips"] < keys["keys_fetched"] / 10
    assert keys["round_trips_per_event"] == pytest.approx(keys["store_round_trips"] / 20000, abs=1e-4)
    # Of them, the data-key loads: about one per batch (each a batch's prefetch), far fewer than the keys.
    assert 0 < keys["data_key_round_trips"] <= keys["store_round_trips"]
    assert keys["data_key_round_trips"] < keys["keys_created"] / 10
    assert keys["data_key_round_trips_per_event"] == pytest.approx(keys["data_key_round_trips"] / 20000, abs=1e-4)
    assert keys["cache_hit_rate"] == pytest.approx(1 - keys["keys_fetched"] / keys["key_lookups"], abs=1e-4)
    # The compiled path's memos: lookups of subject tokens, Kafka keys and the masks Python computes, some
    # answered (the workload's customers recur), reported as a rate in the table.
    assert keys["memo_lookups"] > 20000 and 0 < keys["memo_hits"] < keys["memo_lookups"]
    assert keys["memo_hit_rate"] == pytest.approx(keys["memo_hits"] / keys["memo_lookups"], abs=1e-4)
    # Steady state: the same branch, a new worker: every key exists (none created), none is cached.
    steady = written["modes"]["guard"]["keys"]
    assert steady["keys_created"] == 0 and steady["keys_fetched"] >= workload["distinct_customers"]
    assert 0 < steady["data_key_round_trips"] < steady["keys_fetched"] / 10

    # Policy checks: the guard with them off in the same state, every trial; and every write of the run
    # named its principal (updated_by, or its delete's message), so no guard decided one `unattributed`
    # (nor denied one: the demo policy allows the bench's teller to write and its manager to delete).
    policy = written["policy"]
    assert len(policy["trials_nopolicy_events_per_s"]) == 3 and policy["guard_nopolicy_events_per_s"] > 0
    assert policy["on_vs_off"] == pytest.approx(written["modes"]["guard"]["events_per_s"]
                                                / policy["guard_nopolicy_events_per_s"], rel=1e-2)
    assert policy["write_alerts"] == {"write_unattributed": 0, "write_denied": 0}
    assert any(line.startswith("write decisions not allowed, whole run: 0 unattributed, 0 denied")
               for line in lines)


def _topics_of_run(stack: dict[str, str], runid: str) -> list[str]:
    """The topics naming `bench<runid>` once their deletion has shown in the metadata (it may trail a moment)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    left: list[str] = []
    for _ in range(20):
        left = [t for t in admin.list_topics(timeout=10).topics if f"bench{runid}" in t]
        if not left:
            break
        time.sleep(0.5)
    return left


def _start_bench(stack: dict[str, str], log: Path, **popen: Any) -> tuple[subprocess.Popen[bytes], str]:
    """A small hot bench, and its run id once its first guard trial has run (keys exist in Redis by then)."""
    from tests.integration.reliability_helpers import wait_until

    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard.bench", "--workload", "hot", "--records", "3000", "--partitions", "1",
             "--trials", "3", "--warmup-seconds", "0", "--latency-seconds", "2"],
            cwd=REPO, env={**os.environ, **stack}, stdout=subprocess.DEVNULL, stderr=err, **popen)
    try:
        found = wait_until(lambda: re.search(r"guard trial 1: ", log.read_text())
                           and re.search(r"filled bench([0-9a-f]+)\.", log.read_text()), timeout=300,
                           what="the bench's first guard trial", interval=0.2)
    except BaseException:
        if popen.get("start_new_session"):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers too
        else:
            proc.kill()
        raise
    return proc, found.group(1)


def _run_keys(stack: dict[str, str], runid: str) -> list[bytes]:
    from guard.config import load_settings
    from guard.keys.redis_client import redis_client

    client = redis_client(load_settings(None, redis_url=stack["GUARD_REDIS_URL"]).redis_url)
    return list(client.scan_iter(match=f"bg:*:bench{runid}*", count=1000))


def test_bench_leaves_no_topics(stack: dict[str, str], tmp_path: Path) -> None:
    """Without --keep the run's topics are deleted (a left-over raw topic would hold plaintext)."""
    json_out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "guard.bench", "--workload", "hot", "--records", "3000", "--partitions", "1",
         "--trials", "1", "--warmup-seconds", "0",
         "--latency-seconds", "2", "--json-out", str(json_out)],
        cwd=REPO, env={**os.environ, **stack}, capture_output=True, text=True, timeout=600, check=True,
    )
    report = json.loads(json_out.read_text())
    # The hot workload: customers only, 4,000 customers, every event protected.
    assert report["workload"]["kind"] == "hot" and report["workload"]["tables"] == ["public.customers"]
    guard_worker = report["modes"]["guard_first_sight"]["workers"][0]
    assert guard_worker["decisions"] == {"protected": guard_worker["events"]}, "bench events must all be protected"
    assert _topics_of_run(stack, report["runid"]) == []


def test_a_bench_stopped_with_sigterm_removes_its_topics_and_keys(stack: dict[str, str], tmp_path: Path) -> None:
    """`kill` / `pkill` / a CI timeout send SIGTERM, whose Python default skips every `finally`: a stopped
    bench used to leave its raw topics (plaintext) and all its keys in Redis (419,250 after two stopped runs,
    which made the next append-only-file rewrite take minutes). Stopped after its first guard trial, with keys
    in Redis, it now exits 143 having removed both."""
    log = tmp_path / "bench.log"
    proc, runid = _start_bench(stack, log)
    try:
        assert _run_keys(stack, runid), "the run has keys to remove"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _run_keys(stack, runid) == [], "keys left in Redis"
    assert _topics_of_run(stack, runid) == []


def test_cleanup_removes_what_a_bench_killed_with_sigkill_left(stack: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL leaves a run no chance to clean up: its raw topics (plaintext) and keys stay. `--cleanup`
    removes every run's, here those of a run killed (with its workers) after its first guard trial."""
    from confluent_kafka.admin import AdminClient

    proc, runid = _start_bench(stack, tmp_path / "bench.log", start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the bench and its workers: no `finally` runs anywhere
    proc.wait(timeout=60)
    assert _run_keys(stack, runid), "the killed run left keys"
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    assert f"bench{runid}.public.customers" in admin.list_topics(timeout=10).topics, "and its raw topic"

    out = subprocess.run([sys.executable, "-m", "guard.bench", "--cleanup"], cwd=REPO, env={**os.environ, **stack},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"removed what bench runs left: [1-9]\d* topic\(s\) of [1-9]\d* run\(s\), [1-9]\d* key", out), out
    assert _run_keys(stack, runid) == [], "keys left in Redis"
    assert _topics_of_run(stack, runid) == []


def test_write_alerts_counts_the_committed_write_anomalies(stack: dict[str, str]) -> None:
    """The bench's count of writes not allowed (`write_alerts`) reads what the guards committed: a zero
    in a report means none, not a reader that saw nothing. Two partitions, a committed transaction with
    each kind, an aborted one, other anomalies and a non-JSON record (the analyzer writes Avro)."""
    import uuid

    import orjson
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    from guard.bench.topics import Names, write_alerts
    from tests.integration.reliability_helpers import create_topic

    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    admin = AdminClient(kafka_conf(bootstrap))
    names = Names(uuid.uuid4().hex[:8])
    topic = f"{names.prefix}-guard.anomalies"
    assert write_alerts(kafka_conf(bootstrap), names) == {"write_unattributed": 0, "write_denied": 0}  # no topic
    create_topic(bootstrap, topic, 2)
    try:
        producer = Producer({**kafka_conf(bootstrap), "transactional.id": f"{names.prefix}-alerts-test"})
        producer.init_transactions(30)

        def send(rules: list[str], commit: bool) -> None:
            producer.begin_transaction()
            for n, rule in enumerate(rules):
                producer.produce(topic, orjson.dumps({"type": "anomaly", "rule": rule}), partition=n % 2)
            producer.produce(topic, b"\x00avro", partition=1)
            producer.flush(30)
            (producer.commit_transaction if commit else producer.abort_transaction)(30)

        send(["write_unattributed", "write_denied", "write_unattributed", "rows_without_data_subject"], True)
        send(["write_unattributed", "write_denied"], False)
        send(["write_denied"], True)
        assert write_alerts(kafka_conf(bootstrap), names) == {"write_unattributed": 2, "write_denied": 2}
    finally:
        admin.delete_topics([topic])[topic].result(timeout=60)


def test_db_writer_keeps_its_rate_committing_each_ticks_rows_together(stack: dict[str, str]) -> None:
    """The `--db-latency` writer reaches the rate it is asked for (a commit per row was bounded by the WAL
    flush at ~2,300 rows/s, a tenth of the rate the target names): every tick's due rows are one transaction,
    and every row written is in the database, attributed like the branch's own writes."""
    import psycopg

    from guard.bench.dblatency import write_paced
    from guard.bench.workload import BENCH_PRINCIPAL

    dsn = stack["GUARD_BRANCH_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute("SELECT coalesce(max(txn_id), 0) FROM transactions").fetchone()[0]  # type: ignore[index]
    rate, seconds = 1000.0, 2.0
    wrote = write_paced(dsn, rate, seconds)

    # The rows due are written at every tick, however slow each commit, and the window's last ones at its end.
    assert wrote.rows == int(rate * seconds), wrote
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows, commits, attributed = conn.execute(
            "SELECT count(*), count(DISTINCT xmin::text), count(*) FILTER (WHERE updated_by = %s) "
            "FROM transactions WHERE txn_id > %s", (BENCH_PRINCIPAL, before)).fetchone()  # type: ignore[misc]
    assert rows == wrote.rows
    assert commits == wrote.commits < wrote.rows
    assert wrote.max_rows_per_commit >= 2
    assert attributed == rows


@pytest.mark.parametrize("mode", ["plain", "guard"])
def test_a_drain_by_two_workers_starts_with_their_group_formed(stack: dict[str, str], tmp_path: Path,
                                                              mode: str) -> None:
    """Two workers drain records written after both hold a partition (`guard.bench.gate`): each reads exactly
    its own partition, from the first record on. Without the gate, the first worker to join drained what it
    could of both partitions before the second joined (153,680 against 46,320 events in a 200,000-record
    drain), and the figure was the group's joins."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from guard.bench.drain import drain_fresh
    from guard.bench.gate import start_for_drain
    from guard.bench.topics import Names, cleanup_kafka, cleanup_redis, create_topic, fill
    from guard.bench.workers import BenchContext, GroupProgress, RssSampler, WorkerSet
    from guard.bench.workload import build_workload
    from guard.config import load_settings
    from guard.kafka_security import client_config

    settings = load_settings()
    admin = AdminClient(client_config(settings))
    names = Names(uuid.uuid4().hex[:8])
    workload = build_workload(4000, kind="hot", customers=500)
    assert workload.tables == ["public.customers"] and not workload.has_messages
    sampler = RssSampler(0.5)
    ctx = BenchContext(settings, names, 2, sampler, tmp_path, tables=workload.tables, workload=workload)
    topic = names.input("public.customers")

    def ends() -> list[int]:
        consumer = Consumer(client_config(settings, **{"group.id": names.group("ends")}))
        try:
            return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in (0, 1)]
        finally:
            consumer.close()

    try:
        create_topic(admin, topic, 2)
        create_topic(admin, names.sanitized("public.customers"), 2)
        create_topic(admin, names.plain_out, 2)
        fill(client_config(settings), names, workload)  # the records already there: not this drain's
        before = ends()
        workers = WorkerSet(ctx, mode, 2, names.group(f"gate-{mode}"), f"gate-{mode}")
        try:
            given = start_for_drain(ctx, workers)
            result = drain_fresh(ctx, workers, given)
        finally:
            done = workers.stop()
        written = [end - 1 - start for end, start in zip(ends(), before, strict=True)]  # less the commit marker
        assert given is not None and given.records == sum(written) == len(workload.order), (given, before, written)
        assert result.events == len(workload.order), result
        assert min(written) > 0
        # each worker read one whole partition of the records written again, and nothing else
        assert sorted(int(w["events"]) for w in done) == sorted(written), (done, given, before)
        # a later wait on the group (a latency phase's catch-up) knows the commit markers the write left
        progress = GroupProgress.of(ctx, workers)
        try:
            committed = progress.committed()
            assert progress.ends() == given.targets, (given, ctx.markers)
            assert all(committed[tp] >= at for tp, at in given.targets.items()), (committed, given)
        finally:
            progress.close()
    finally:
        sampler.close()
        cleanup_kafka(admin, names, ctx.groups)
        cleanup_redis(settings.redis_url, names, [])
