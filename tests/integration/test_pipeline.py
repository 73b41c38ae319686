"""End to end on the real stack: branch PostgreSQL → Debezium → Kafka → guard → sanitized topics.

The guard runs as a real `guard run` process. Leak checks scan the raw bytes (keys and values) of every
committed record of the sanitized topics for every sensitive value the test wrote.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from guard.config import load_settings
from guard.errors import KeyShreddedError
from guard.pipeline.runtime import build_keys
from guard.protect.reveal import open_image
from guard.records.codec import decode
from guard.workload import synth
from guard.workload.branch import run_workload
from tests.integration.kafka_helpers import (
    GuardProcess,
    LeakScanner,
    kafka_conf,
    produce_raw,
    read_all,
    sanitizer_anomalies,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def guard_env(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory, catalog_without_grace: Path):
    """One guard worker for the module, in its own consumer group so it sanitizes everything it sees; an
    erasure happens at the delete (no grace period), so the erasure test need not wait 30 s for it."""
    group = f"e2e-{uuid.uuid4().hex[:8]}"
    worker = GuardProcess(stack, worker_id=f"{group}-w1", group_id=group,
                          log_dir=tmp_path_factory.mktemp("guard-logs"),
                          extra_env={"GUARD_CATALOG": str(catalog_without_grace)}).start(from_end=True)
    time.sleep(2)
    assert worker.alive(), worker.log()
    yield stack
    worker.stop()
    print(worker.log()[-3000:])


@pytest.fixture(scope="module")
def keys(stack: dict[str, str]):
    settings = load_settings(None, redis_url=stack["GUARD_REDIS_URL"])
    return build_keys(settings, listen=False)


def _customer_records(bootstrap: str, topic: str, ids: set[int]) -> list:
    return [r for r in read_all(bootstrap, topic)
            if r.key is not None and orjson.loads(r.key).get("customer_id") in ids]


def _assert_no_leak(bootstrap: str, topics: list[str], values: set[str]) -> int:
    scanner = LeakScanner.of(values)
    assert scanner
    scanned = 0
    for topic in topics:
        for rec in read_all(bootstrap, topic):
            scanned += 1
            found = scanner.find((rec.key or b"") + b"\x00" + (rec.value or b""))
            assert found is None, f"plaintext leaked into {topic}[{rec.partition}] at offset {rec.offset}"
    return scanned


def test_rows_inserted_updated_deleted_flow_through_protected(guard_env, keys):
    env = guard_env
    bootstrap = env["GUARD_KAFKA_BOOTSTRAP"]
    result = run_workload(env["GUARD_BRANCH_DSN"], customers=6, update=2, delete=1, seed=random.randrange(1 << 30))
    ids = set(result.customers)
    topic = "sanitized.br0101.public.customers"
    records = wait_for(bootstrap, topic, lambda rs: {
        (orjson.loads(r.key)["customer_id"], decode(r.value)["op"]) for r in rs
        if r.key and r.value and orjson.loads(r.key).get("customer_id") in ids
    } >= {(c, "c") for c in ids} | {(c, "u") for c in result.updated} | {(c, "d") for c in result.deleted_customers})
    mine = [r for r in records if r.key and orjson.loads(r.key).get("customer_id") in ids]
    # a tombstone follows each delete, with the sanitized key
    assert any(r.value is None and orjson.loads(r.key)["customer_id"] in result.deleted_customers for r in mine)
    # updates carry both images, both sealed
    update = next(decode(r.value) for r in mine if r.value and decode(r.value)["op"] == "u")
    assert update["before"]["sealed"] and update["after"]["sealed"]
    assert update["after"]["masked"]["mobile"].count("*") == 4
    # a surviving customer's latest record opens to exactly what the branch database holds
    alive = next(c for c in result.customers if c not in result.deleted_customers)
    latest = [r for r in mine if r.value and orjson.loads(r.key)["customer_id"] == alive][-1]
    opened = open_image(keys, decode(latest.value), "after", topic=topic, row_key=latest.key)
    with psycopg.connect(env["GUARD_BRANCH_DSN"]) as conn:
        name, mobile = conn.execute("SELECT name, mobile FROM customers WHERE customer_id = %s", (alive,)).fetchone()
    assert opened["name"] == name and opened["mobile"] == mobile
    # accounts and transactions of these customers arrive too (the account number key is tokenised)
    wait_for(bootstrap, "sanitized.br0101.public.accounts", lambda rs: len(rs) > 0)
    scanned = _assert_no_leak(bootstrap, [topic, "sanitized.br0101.public.accounts",
                                          "sanitized.br0101.public.transactions",
                                          "sanitized.br0101.public.customer_auth", "guard.audit", "guard.dlq",
                                          "guard.anomalies", "guard.deletions"], result.sensitive_values)
    assert scanned > 0


def test_table_created_during_the_test_is_captured_protected_and_alerted(guard_env):
    env = guard_env
    bootstrap = env["GUARD_KAFKA_BOOTSTRAP"]
    table = f"late_{uuid.uuid4().hex[:8]}"
    rng = random.Random()
    rows = [(synth.resident_id(rng), synth.mobile(rng), synth.bank_card(rng), synth.chinese_name(rng),
             synth.address(rng)) for _ in range(5)]
    with psycopg.connect(env["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        # misleading column names: nothing in them says "ID", "phone" or "card"
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, remark2 text, ref_code text, note text, "
                     "nm text, loc text, qty int)")
        for row in rows:
            conn.execute(f"INSERT INTO {table} (remark2, ref_code, note, nm, loc, qty) VALUES (%s,%s,%s,%s,%s,1)", row)
    topic = f"sanitized.br0101.public.{table}"
    records = wait_for(bootstrap, topic, lambda rs: len([r for r in rs if r.value]) >= 5, timeout=120)
    first = decode(next(r.value for r in records if r.value))
    # the sanitized topic has its raw topic's partitions, so every record keeps its partition
    topics = AdminClient(kafka_conf(bootstrap)).list_topics(timeout=10).topics
    assert len(topics[topic].partitions) == len(topics[f"br0101.public.{table}"].partitions) == 3
    assert set(first["unclassified"]) >= {"remark2", "ref_code", "note", "nm", "loc"}
    assert set(first["after"]["sealed"]["fields"]) >= {"remark2", "ref_code", "note", "nm", "loc"}
    _assert_no_leak(bootstrap, [topic, "guard.anomalies", "guard.audit"], {v for row in rows for v in row})
    def mine_of(rs: list) -> list[dict]:
        return [a for a in sanitizer_anomalies(rs) if a.get("table") == f"public.{table}"]

    alerts = wait_for(bootstrap, "guard.anomalies",
                      lambda rs: {a.get("column") for a in mine_of(rs)} >= {"remark2", "ref_code", "note"})
    mine = mine_of(alerts)
    detected = {a["column"]: a["detected"] for a in mine if a["rule"] == "schema_drift_unclassified_column"}
    # the table has no customer column: its rows are sealed under per-row keys, and that is said once
    assert [a["rule"] for a in mine].count("rows_without_data_subject") == 1
    assert detected["remark2"].startswith("resident_id")
    assert detected["ref_code"].startswith("mobile")
    assert detected["note"].startswith("bank_card")


def test_malformed_record_goes_to_dlq_and_the_guard_keeps_going(guard_env):
    env = guard_env
    bootstrap = env["GUARD_KAFKA_BOOTSTRAP"]
    marker = uuid.uuid4().hex
    produce_raw(bootstrap, "br0101.public.customers", b'{"op": "c", "after": {"note": "' + marker.encode() + b'"',
                key=b'{"customer_id": -1}')
    produce_raw(bootstrap, "br0101.public.customers", b'{"op": "zz", "source": {"table": "customers"}}',
                key=b'{"customer_id": -2}')
    dlq = wait_for(bootstrap, "guard.dlq", lambda rs: sum(
        orjson.loads(r.value)["source"]["topic"] == "br0101.public.customers"
        and orjson.loads(r.value)["reason"] in ("invalid_json", "unknown_op") for r in rs) >= 2)
    assert all(marker.encode() not in r.value for r in dlq), "the DLQ must hold the input sealed, not in clear"
    # the guard is still alive and still sanitizing
    result = run_workload(env["GUARD_BRANCH_DSN"], customers=1, update=0, delete=0)
    wait_for(bootstrap, "sanitized.br0101.public.customers",
             lambda rs: any(r.key and orjson.loads(r.key).get("customer_id") == result.customers[0] for r in rs))


def test_deleting_a_customer_shreds_its_key_and_confirms(guard_env, keys):
    env = guard_env
    bootstrap = env["GUARD_KAFKA_BOOTSTRAP"]
    result = run_workload(env["GUARD_BRANCH_DSN"], customers=2, update=0, delete=0)
    victim, survivor = result.customers
    topic = "sanitized.br0101.public.customers"
    before = wait_for(bootstrap, topic, lambda rs: len(_pick(rs, {victim, survivor})) >= 2)
    victim_rec = _pick(before, {victim})[0]
    record = decode(victim_rec.value)
    assert open_image(keys, record, "after", topic=topic, row_key=victim_rec.key)["name"]
    with psycopg.connect(env["GUARD_BRANCH_DSN"], autocommit=True) as conn, conn.transaction():
        for table in ("transactions", "accounts", "customer_auth", "customers"):
            conn.execute(f"DELETE FROM {table} WHERE customer_id = %s", (victim,))
    confirmations = wait_for(bootstrap, "guard.deletions", lambda rs: any(
        orjson.loads(r.value)["subject"] == record["subject"] for r in rs if r.value))
    confirmation = next(orjson.loads(r.value) for r in confirmations
                        if r.value and orjson.loads(r.value)["subject"] == record["subject"])
    assert confirmation["outcome"] == "shredded" and confirmation["keys_destroyed"]
    assert topic in confirmation["unreadable_topics"]
    assert confirmation["reason_code"].startswith("art47")
    keys.forget("0101", record["subject"])
    with pytest.raises(KeyShreddedError):
        open_image(keys, record, "after", topic=topic, row_key=victim_rec.key)
    other = _pick(before, {survivor})[0]
    assert open_image(keys, decode(other.value), "after", topic=topic, row_key=other.key)["name"]


def _pick(records, ids):
    return [r for r in records if r.key and r.value and orjson.loads(r.key).get("customer_id") in ids
            and decode(r.value)["op"] in ("c", "r")]

