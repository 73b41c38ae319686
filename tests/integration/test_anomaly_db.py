"""Scenarios in the branch database, end to end: PostgreSQL → Debezium → the sanitizer (`guard run`) → its
sanitized and audit topics → the faust analyzer → alerts. The analyzer sees tokens and decisions only.

Normal traffic runs beside each scenario and must raise nothing: customers whose mobiles change to
different numbers, a large transaction of a customer whose contact details did not change, a small one of a
customer whose did, and the delete of a customer who is not under legal hold.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from guard.config import load_settings
from guard.keys.store import RedisKeyStore
from guard.pipeline.runtime import build_keys
from tests.integration.kafka_helpers import GuardProcess, admin_redis_env, kafka_conf, read_all
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
               "GUARD_DLQ_TOPIC": env.topic("dlq"), "GUARD_FACTS_TOPIC": env.topic("facts")}
    env.create_topics()
    guard = GuardProcess(stack, worker_id=f"{env.name}-g", group_id=f"{env.name}-g", log_dir=tmp_path,
                         extra_env=outputs).start(from_end=True)
    try:
        yield env, guard
    finally:
        guard.stop()
        env.stop()


def test_takeover_patterns_and_delete_under_legal_hold(pipeline: tuple[Env, GuardProcess],
                                                      stack: dict[str, str]) -> None:
    """Planted: three customers given the same mobile; a customer's mobile changed, then a large transaction
    on the customer's account (critical; the amount reaches the analyzer as a band on the facts topic, never
    as a value); the delete of a customer under legal hold. Normal beside them: customers changing to numbers
    of their own, a large transaction of a customer whose details did not change, a small one of a customer
    whose did, the delete of a customer not under hold. (One scenario, one sanitizer and one analyzer: the
    test costs CI one start of each.)"""
    env, guard = pipeline
    contact_topic = f"{env.name}.sanitized.br0101.public.customers"
    base = 700_000_000 + uuid.uuid4().int % 10_000_000
    ids = [base + i for i in range(9)]
    settings = load_settings(None, redis_url=stack["GUARD_REDIS_URL"],
                             redis_password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    keys = build_keys(settings, listen=False)
    held, free = ids[6], ids[7]
    victim, small, other = ids[3], ids[4], ids[8]  # victim and small change their mobile (normal, own numbers)
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
        for cid, amount in ((victim, "86000.00"), (other, "92000.00"), (small, "120.00")):
            conn.execute("INSERT INTO transactions (account_no, customer_id, amount, direction, channel) VALUES "
                         "(%s, %s, %s, 'D', 'counter')", (f"62220{cid}", cid, amount))
        conn.execute("DELETE FROM customers WHERE customer_id = ANY(%s)", ([held, free],))
    try:
        env.wait_alerts(lambda a: _by_rule(a, "contact_same_value_many_customers")
                        and _by_rule(a, "delete_under_legal_hold")
                        and _by_rule(a, "contact_change_then_large_transaction"), timeout=240)
    finally:
        for store in (keys.store, analyzer_store):
            store.set_hold(settings.branch, held_token, False)
    # the sanitizer wrote two transaction facts (the large ones), bands only; the analyzer read everything
    facts = [orjson.loads(r.value) for r in read_all(env.bootstrap, env.topic("facts")) if r.value]
    txn = [f for f in facts if f["kind"] == "transaction"]
    tokens = {keys.subject_token(settings.branch, str(cid)): cid for cid in (victim, other, small)}
    assert sorted(tokens[f["subject"]] for f in txn) == sorted([victim, other])
    assert {f["attrs"]["amount_band"] for f in txn} == {"large"}
    assert "86000.00" not in orjson.dumps(facts).decode() and "92000.00" not in orjson.dumps(facts).decode()
    for topic in (env.topic("facts"), contact_topic, env.topic("audit")):
        env.wait_consumed(topic)
    alerts = env.alerts()
    same = _by_rule(alerts, "contact_same_value_many_customers")
    assert len({a["id"] for a in same}) == 1 and max(a["count"] for a in same) == 3
    assert any(e["kind"] == "token" for e in same[-1]["evidence"])
    takeover = _by_rule(alerts, "contact_change_then_large_transaction")
    assert len({a["id"] for a in takeover}) == 1 and takeover[0]["severity"] == "critical"
    assert {"kind": "subject", "ref": keys.subject_token(settings.branch, str(victim))} in takeover[0]["evidence"]
    hold = _by_rule(alerts, "delete_under_legal_hold")
    assert len({a["id"] for a in hold}) == 1 and hold[0]["severity"] == "critical"
    assert {"kind": "subject", "ref": held_token} in hold[0]["evidence"]
    assert not _by_rule(alerts, "unexplained_delete"), "customers' deletes are erasures by the catalog"
    # no plaintext in any alert: neither the numbers, the amounts nor the names
    text = str(alerts)
    assert "13912345678" not in text and "测试" not in text and "86000.00" not in text
