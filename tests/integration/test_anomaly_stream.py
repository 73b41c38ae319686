"""The faust-streaming analyzer (streams/analyzer.py) over real Kafka topics and the stack's Redis.

Each test gets its own topics, consumer group (faust app id) and tenant (Redis prefix), so nothing is
shared with other tests or earlier runs. Workers are real processes, run as the `analyzer` Kafka principal
(its password, its ACLs); one is killed with SIGKILL. The tests' topics are named under the analyzer's app
id (`branchguard-analyzer-t<hex>`), the one prefix that principal may create and read besides the
deployment's own topics.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from guard.anomaly.alerts import read_anomaly
from guard.anomaly.rules import default_rules_path
from guard.keys.redis_client import redis_client
from guard.stack.config import StackConfig
from guard.stack.kafka_auth import ANALYZER_APP
from tests.integration.kafka_helpers import REPO, admin_redis_env, kafka_conf, read_all

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack: dict[str, str]) -> dict[str, str]:
    """The stack with Redis as its admin: these tests give each test a tenant of its own."""
    return {**stack, **admin_redis_env(stack)}

SH = ZoneInfo("Asia/Shanghai")


def _now_in_hours() -> int:
    """A fact time inside the branch's business hours: 10:00 Shanghai today, or on the last Wednesday to Friday.

    The tests stamp baseline facts up to two days before it, and those must fall in business hours too: with any
    weekday, a Monday's or Tuesday's baseline fell on the weekend and "normal traffic" raised
    `outside_business_hours` (the test failed on Mondays and Tuesdays in Shanghai, e.g. 2026-12-07)."""
    day = datetime.now(SH).replace(hour=10, minute=0, second=0, microsecond=0)
    while day.isoweekday() not in (3, 4, 5):
        day -= timedelta(days=1)
    return int(day.timestamp() * 1000)


@dataclass
class Env:
    """One test's topics, tenant and worker environment."""

    stack: dict[str, str]
    tmp: Path
    #: Under the analyzer principal's own prefix (its faust app id, guard/stack/kafka_auth.py): the worker runs
    #: as `analyzer`, and a test's topics and group must be ones that principal may use.
    name: str = field(default_factory=lambda: f"{ANALYZER_APP}-t{uuid.uuid4().hex[:8]}")
    webhook_url: str = ""
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return self.stack["GUARD_KAFKA_BOOTSTRAP"]

    def topic(self, role: str) -> str:
        return f"{self.name}.{role}"

    def create_topics(self) -> None:
        admin = AdminClient(kafka_conf(self.bootstrap))
        new = [NewTopic(self.topic("facts"), 3, 1)] + [NewTopic(self.topic(r), 1, 1) for r in
                                                        ("audit", "dlq", "anomalies", "deletions", "contact")]
        for fut in admin.create_topics(new).values():
            fut.result(30)

    def rules(self) -> Path:
        path = self.tmp / "rules.toml"
        text = default_rules_path().read_text()
        text = text.replace('webhook_url = ""', f'webhook_url = "{self.webhook_url}"')
        text = text.replace("min_update_interval_s = 60", "min_update_interval_s = 1")
        path.write_text(text)
        return path

    def start_worker(self, tag: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # the worker is the `analyzer` principal (SCRAM, its ACLs), not the admin the tests produce and read as
        env = {**os.environ, **self.stack, **StackConfig.from_env().kafka_env("analyzer"), "PYTHONPATH": str(REPO),
               "GUARD_TENANT": self.name,
               "GUARD_AUDIT_TOPIC": self.topic("audit"), "GUARD_DLQ_TOPIC": self.topic("dlq"),
               "GUARD_ANOMALIES_TOPIC": self.topic("anomalies"), "GUARD_DELETIONS_TOPIC": self.topic("deletions"),
               "GUARD_FACTS_TOPIC": self.topic("facts"), "GUARD_CONTACT_TOPICS": self.topic("contact"),
               "GUARD_ANALYZER_APP_ID": self.name, "GUARD_ANALYZER_DATADIR": str(self.tmp / f"data-{tag}"),
               "GUARD_ANALYZER_FLUSH_S": "2", "GUARD_ANOMALY_RULES": str(self.rules()), **(extra or {})}
        log = self.tmp / f"worker-{tag}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "streams.analyzer", "worker", "--without-web", "-l",
                                     "info"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers.append((proc, log))
        return proc

    def produce(self, facts: list[dict[str, Any]]) -> None:
        """Keyed by principal (a principal's facts stay in order, as the policy engine writes them)."""
        p = Producer({**kafka_conf(self.bootstrap), "linger.ms": 5})
        for f in facts:
            key = str(f.get("key") or f.get("principal") or f["branch"]).encode()
            p.produce(self.topic("facts"), json.dumps(f).encode(), key=key)
        assert p.flush(30) == 0

    def alerts(self) -> list[dict[str, Any]]:
        return [read_anomaly(r.value) for r in read_all(self.bootstrap, self.topic("anomalies")) if r.value]

    def wait_alerts(self, predicate: Any, timeout: float = 180.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.alerts()
            if predicate(seen):
                return seen
            for proc, log in self.workers:
                assert proc.poll() is None or proc.returncode == -signal.SIGKILL, \
                    f"analyzer died:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(1.0)
        logs = "\n".join(log.read_text(errors="replace")[-2000:] for _, log in self.workers)
        raise AssertionError(f"alerts never matched; saw {[(a['rule'], a.get('count')) for a in seen]}\n{logs}")

    def wait_consumed(self, topic: str, timeout: float = 180.0) -> None:
        """Wait until the analyzers' group (the app id) has committed past the last record of `topic`
        (at-least-once: faust commits a batch's offsets after the agent finished it, so everything before is
        counted). The last *record*, not the high watermark: a transactional producer's (the sanitizer's)
        commit markers take offsets too, and a consumer's position never needs to pass the last one."""
        from confluent_kafka import Consumer, TopicPartition

        last: dict[int, int] = {}
        for rec in read_all(self.bootstrap, topic):
            last[rec.partition] = max(last.get(rec.partition, -1), rec.offset)
        consumer = Consumer({**kafka_conf(self.bootstrap), "group.id": self.name, "enable.auto.commit": False})
        try:
            deadline = time.monotonic() + timeout
            while True:
                done = {tp.partition: tp.offset for tp in consumer.committed(
                    [TopicPartition(topic, p) for p in last], timeout=10)}
                if all(done.get(p, -1) > offset for p, offset in last.items()):
                    return
                assert time.monotonic() < deadline, f"the analyzer did not consume {topic}: {done}, last {last}"
                time.sleep(1.0)
        finally:
            consumer.close()

    def wait_assigned(self, topic: str, workers: int, timeout: float = 180.0) -> None:
        """Wait until `workers` workers each own a partition of `topic` (their latest ASSIGNED line)."""
        deadline = time.monotonic() + timeout
        owners = 0
        while time.monotonic() < deadline:
            owners = 0
            for _, log in self.workers:
                lines = [x for x in log.read_text(errors="replace").splitlines() if "ASSIGNED " in x]
                owners += bool(lines and f"{topic}:" in lines[-1])
            if owners >= workers:
                return
            time.sleep(1.0)
        raise AssertionError(f"only {owners} worker(s) own partitions of {topic}")

    def stop(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        admin = AdminClient(kafka_conf(self.bootstrap))
        admin.delete_topics([self.topic(r) for r in ("facts", "audit", "dlq", "anomalies", "deletions", "contact")])


@pytest.fixture()
def env(stack: dict[str, str], tmp_path: Path) -> Iterator[Env]:
    e = Env(stack, tmp_path)
    e.create_topics()
    try:
        yield e
    finally:
        e.stop()


def _fact(kind: str, ts: int, **kw: Any) -> dict[str, Any]:
    return {"v": 1, "kind": kind, "id": f"{kind}-{uuid.uuid4().hex}", "ts_ms": ts, "branch": "0101", **kw}


def _registry(ts: int, *principals: str, owner: str = "bank-a") -> list[dict[str, Any]]:
    return [_fact("principal", ts - 86_400_000, principal=p, attrs={"state": "active", "owner": owner})
            for p in principals]


def _by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a.get("type") == "alert" and a["rule"] == rule]


class Webhook(http.server.BaseHTTPRequestHandler):
    """Refuses the first two POSTs (503), then accepts: the analyzer must retry."""

    received: list[tuple[str, dict[str, Any]]] = []
    attempts = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).attempts += 1
        if type(self).attempts <= 2:
            self.send_response(503)
            self.end_headers()
            return
        type(self).received.append((self.headers["Idempotency-Key"], json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_one_alert_across_sigkill_and_critical_webhook(env: Env) -> None:
    """Bulk exports raise one alert that keeps its id while the condition continues, through a SIGKILL and a
    restart of the analyzer (replayed facts count once); normal traffic beside it raises nothing; a former
    owner's access after the transfer cut-off is critical and reaches the webhook after two refusals."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env.webhook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    t0 = _now_in_hours()
    baseline = [_fact("access", t0 - 2 * 86_400_000, principal=p, action="reveal", categories={"account": 1,
                                                                                           "contact": 1})
                for p in ("teller-1", "teller-2", "old-teller")]
    normal = [_fact("access", t0 + i * 1000, principal="teller-2", action="reveal", subject=f"s{i}",
                    categories={"contact": 1}) for i in range(30)]
    exports = [_fact("access", t0 + i * 1000, principal="teller-1", action="export", count=10,
                     categories={"account": 10}) for i in range(4)]  # 40 > 25 account records a day
    cutoff = t0 + 200_000
    transfer = [_fact("principal", t0 - 86_400_000 + 1, principal="old-teller",
                      attrs={"state": "active", "owner": "bank-old"}),
                _fact("transfer", t0, attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": cutoff})]
    env.produce(_registry(t0, "teller-1", "teller-2", "old-teller") + baseline + normal + exports + transfer)
    worker = env.start_worker("a")
    env.wait_alerts(lambda a: _by_rule(a, "bulk_access"))
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(30)
    more = [_fact("access", t0 + 100_000 + i * 1000, principal="teller-1", action="export", count=10,
                  categories={"account": 10}) for i in range(6)]
    # the old owner's teller before the cut-off is normal; after it, critical
    late = [_fact("access", cutoff - 5_000, principal="old-teller", action="reveal", categories={"contact": 1}),
            _fact("access", cutoff + 5_000, principal="old-teller", action="reveal", categories={"contact": 1})]
    env.produce(more + late)
    env.start_worker("b")
    alerts = env.wait_alerts(lambda a: any(x["count"] == 100 for x in _by_rule(a, "bulk_access"))
                             and _by_rule(a, "access_after_transfer_cutoff"))
    bulk = _by_rule(alerts, "bulk_access")
    assert len({a["id"] for a in bulk}) == 1, "one alert for a continuing condition"
    assert max(a["count"] for a in bulk) == 100, "replayed exports counted once"
    assert all(a["principal"] == "teller-1" for a in bulk)
    assert bulk[0]["state"] == "open" and bulk[0]["version"] == 1
    assert all(a["state"] == ("open" if a["version"] == 1 else "updated") for a in bulk)
    assert max(a["version"] for a in bulk) > 1, "the continuing condition updated its alert"
    assert not [a for a in alerts if a.get("principal") == "teller-2"], "normal traffic raised an alert"
    [critical] = {a["id"]: a for a in _by_rule(alerts, "access_after_transfer_cutoff")}.values()
    assert critical["severity"] == "critical" and critical["principal"] == "old-teller"
    deadline = time.monotonic() + 60
    while not Webhook.received and time.monotonic() < deadline:
        time.sleep(0.5)
    server.shutdown()
    assert Webhook.received, "the critical alert never reached the webhook"
    key, body = Webhook.received[0]
    assert body["id"] == critical["id"] and key.startswith(critical["id"] + ":")
    assert Webhook.attempts >= 3, "two refusals, then a retry that succeeded"
    text = json.dumps([a for a in alerts]) + "".join(log.read_text(errors="replace") for _, log in env.workers)
    assert "Traceback" not in text


def test_two_workers_agree_on_counts(env: Env, stack: dict[str, str]) -> None:
    """Two workers of one group split the partitions; the count in the alert is the exact total of both."""
    t0 = _now_in_hours()
    env.start_worker("a")
    env.start_worker("b")
    env.wait_assigned(env.topic("facts"), workers=2)
    base = [_fact("access", t0 - 2 * 86_400_000, principal="teller-7", action="reveal",
                  categories={"transaction": 1})]
    env.produce(_registry(t0, "teller-7") + base)
    n = 0
    for batch in range(6):
        facts = [_fact("access", t0 + batch * 10_000 + i, principal="teller-7", action="search", count=7,
                       key=f"p{batch}-{i}", categories={"transaction": 7}) for i in range(10)]
        env.produce(facts)
        n += 7 * len(facts)
        time.sleep(1)
    alerts = env.wait_alerts(lambda a: any(x["count"] == n for x in _by_rule(a, "bulk_access")))
    assert len({a["id"] for a in _by_rule(alerts, "bulk_access")}) == 1
    assert max(a["count"] for a in _by_rule(alerts, "bulk_access")) == n == 420
    client = redis_client(stack["GUARD_REDIS_URL"], stack["GUARD_REDIS_PASSWORD_FILE"])
    totals = [int(client.hget(k, "__total") or 0) for k in client.scan_iter(f"bg:{env.name}:anomaly:cnt:bulk:*")]
    assert totals == [n + 1] or sorted(totals) == [1, n], totals
    handled = {}
    for tag, (_, log) in zip("ab", env.workers, strict=True):
        lines = [line for line in log.read_text(errors="replace").splitlines() if "STATS facts=" in line]
        handled[tag] = int(lines[-1].split("facts=")[1].split()[0]) if lines else 0
    print("facts handled per worker:", handled)
    assert all(handled.values()), f"both workers must have counted facts: {handled}"


def test_throughput_of_one_worker(env: Env) -> None:
    """One worker reads a backlog of sanitizer audit records (most yield no fact) and access facts; every fact
    is counted exactly (the alert's count), and the worker's rate is printed (docs/anomalies.md, "Throughput")."""
    from guard.records.codec import AvroCodec

    t0 = _now_in_hours()
    codec = AvroCodec("audit_record")
    audits, facts_n = 20_000, 3_000
    p = Producer({**kafka_conf(env.bootstrap), "linger.ms": 20})
    for i in range(audits):  # what the sanitizer writes per change event
        p.produce(env.topic("audit"), codec.encode({
            "v": 1, "ts_ms": t0 + i, "worker": "w", "branch": "0101", "source_topic": "br0101.public.accounts",
            "source_partition": 0, "source_offset": i, "table": "public.accounts", "op": "u",
            "subject": f"s{i % 500}", "decision": "protected", "reason": None, "classes": {"C2": 3},
            "actions": {"sealed": 3}, "unclassified": [], "trace_id": None}))
    assert p.flush(60) == 0
    env.produce(_registry(t0, *(f"teller-{i}" for i in range(30))) + [
        _fact("access", t0 + i, principal=f"teller-{i % 30}", action="reveal", subject=f"s{i}",
              categories={"transaction": 1}) for i in range(facts_n)])
    env.start_worker("a")
    total = audits + facts_n + 30

    def done() -> str | None:
        lines = [x for x in env.workers[0][1].read_text(errors="replace").splitlines() if "STATS facts=" in x]
        return lines[-1] if lines and f"records={total} " in lines[-1] else None

    deadline = time.monotonic() + 300
    while done() is None and time.monotonic() < deadline:
        time.sleep(1)
    line = done()
    assert line, "the worker did not finish the backlog"
    print("analyzer throughput:", line.split("STATS ", 1)[1])
    assert f"facts={facts_n + 30} " in line
    # 3,000 transaction reveals by 30 tellers: 100 each, under the daily 250: no bulk alert
    assert not _by_rule(env.alerts(), "bulk_access")
