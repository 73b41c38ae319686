"""Scenarios in the branch database, end to end: PostgreSQL → Debezium → the sanitizer (`guard run`) → its
sanitized and audit topics → the faust analyzer → alerts. The analyzer sees tokens and decisions only.

Normal traffic runs beside each scenario and must raise nothing: customers whose mobiles change to
different numbers, and the delete of a customer who is not under legal hold.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from guard.config import load_settings
from guard.keys.store import RedisKeyStore
from guard.pipeline.runtime import build_keys
from tests.integration.kafka_helpers import GuardProcess, admin_redis_env, kafka_conf
from tests.integration.test_anomaly_stream import Env, _by_rule

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack: dict[str, str]) -> dict[str, str]:
    """The stack with Redis as its admin: these tests give each test a tenant of its own."""
    return {**stack, **admin_redis_env(stack)}


@pytest.fixture()
def pipeline(stack: dict[str, str], tmp_path: Path) -> Iterator[tuple[Env, GuardProcess]]:
    env = Env(stack, tmp_path)
    outputs = {"GUARD_SANITIZED_PREFIX": f"{env.name}.sanitized.", "GUARD_AUDIT_TOPIC": env.topic("audit"),
               "GUARD_ANOMALIES_TOPIC": env.topic("anomalies"), "GUARD_DELETIONS_TOPIC": env.topic("deletions"),
               "GUARD_DLQ_TOPIC": env.topic("dlq")}
    env.create_topics()
    guard = GuardProcess(stack, worker_id=f"{env.name}-g", group_id=f"{env.name}-g", log_dir=tmp_path,
                         extra_env=outputs).start(from_end=True)
    try:
        yield env, guard
    finally:
        guard.stop()
        env.stop()


def test_same_mobile_on_several_customers_and_delete_under_legal_hold(
        pipeline: tuple[Env, GuardProcess], stack: dict[str, str]) -> None:
    env, guard = pipeline
    contact_topic = f"{env.name}.sanitized.br0101.public.customers"
    base = 700_000_000 + uuid.uuid4().int % 10_000_000
    ids = [base + i for i in range(8)]
    settings = load_settings(None, redis_url=stack["GUARD_REDIS_URL"],
                             redis_password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    keys = build_keys(settings, listen=False)
    held, free = ids[6], ids[7]
    held_token = keys.subject_token(settings.branch, str(held))
    # the hold in the guard's tenant (the sanitizer's) and in the analyzer's (a tenant of this test's own:
    # its counters start from zero); in a deployment both are the one GUARD_TENANT
    analyzer_store = RedisKeyStore(stack["GUARD_REDIS_URL"], env.name, password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    for store in (keys.store, analyzer_store):
        store.set_hold(settings.branch, held_token, True)
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        for cid in ids:
            conn.execute("INSERT INTO customers (customer_id, name, mobile, branch_code) VALUES (%s, '测试', %s, "
                         "'0101')", (cid, f"1380000{cid % 10_000:04d}"))
    # the analyzer starts once the sanitizer has written the inserts (its contact topic exists by then)
    admin = AdminClient(kafka_conf(env.bootstrap))
    deadline = time.monotonic() + 180
    while contact_topic not in admin.list_topics(timeout=10).topics:
        assert guard.alive() and time.monotonic() < deadline, guard.log()[-3000:]
        time.sleep(1)
    env.start_worker("a", {"GUARD_CONTACT_TOPICS": contact_topic})
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        for cid in ids[:3]:  # three customers get the same (new) mobile: a takeover pattern
            conn.execute("UPDATE customers SET mobile = '13912345678' WHERE customer_id = %s", (cid,))
        for cid in ids[3:6]:  # normal: three customers each change to their own new number
            conn.execute("UPDATE customers SET mobile = %s WHERE customer_id = %s", (f"1370000{cid % 10_000:04d}", cid))
        conn.execute("DELETE FROM customers WHERE customer_id = ANY(%s)", ([held, free],))
    try:
        alerts = env.wait_alerts(lambda a: _by_rule(a, "contact_same_value_many_customers")
                                 and _by_rule(a, "delete_under_legal_hold"), timeout=240)
    finally:
        for store in (keys.store, analyzer_store):
            store.set_hold(settings.branch, held_token, False)
    same = _by_rule(alerts, "contact_same_value_many_customers")
    assert len({a["id"] for a in same}) == 1 and max(a["count"] for a in same) == 3
    assert any(e["kind"] == "token" for e in same[-1]["evidence"])
    hold = _by_rule(alerts, "delete_under_legal_hold")
    assert len({a["id"] for a in hold}) == 1 and hold[0]["severity"] == "critical"
    assert {"kind": "subject", "ref": held_token} in hold[0]["evidence"]
    assert not _by_rule(alerts, "unexplained_delete"), "customers' deletes are erasures by the catalog"
    # no plaintext in any alert: neither the numbers nor the names
    text = str(alerts)
    assert "13912345678" not in text and "测试" not in text
