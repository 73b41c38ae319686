"""guard.audit and guard.deletions keep their records for years, on the real stack (issue 13 item 8).

A worker creates the evidence topics with the configured retention and raises an existing topic that
keeps only the broker's week; `guard doctor` fails on a week-long evidence topic and passes otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from guard.config import Settings
from guard.doctor.evidence import check_evidence_topics
from guard.kafka.evidence import prepare_evidence_topics, topic_configs
from tests.integration.kafka_helpers import GUARD, REPO, GuardProcess, admin_kafka_settings, kafka_conf

pytestmark = pytest.mark.integration

YEAR_MS = 365 * 86_400_000
WEEK_MS = 7 * 86_400_000


@pytest.fixture
def topics(stack: dict[str, str]):
    """Names for this test's evidence topics; deleted afterwards (they keep records for years)."""
    admin = AdminClient(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]))
    uid = uuid.uuid4().hex[:8]
    names = (f"ev-{uid}.audit", f"ev-{uid}.deletions")
    yield names
    existing = [t for t in names if t in admin.list_topics(timeout=10).topics]
    for fut in admin.delete_topics(existing, operation_timeout=30).values() if existing else []:
        fut.result(timeout=60)


def _week_topic(admin: AdminClient, name: str) -> None:
    """A topic as the guard used to get it: the broker's defaults (retention.ms = 7 days)."""
    admin.create_topics([NewTopic(name, 3, 1)])[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while True:  # the broker's metadata may lag the controller's answer for a moment
        try:
            assert topic_configs(admin, [name])[name]["retention.ms"] == str(WEEK_MS)
            return
        except KafkaException:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_worker_creates_and_raises_the_evidence_topics(stack: dict[str, str], tmp_path: Path,
                                                        topics: tuple[str, str]) -> None:
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    admin = AdminClient(kafka_conf(bootstrap))
    audit, deletions = topics
    _week_topic(admin, audit)  # exists with a week: raised at start; deletions is missing: created
    extra = {"GUARD_AUDIT_TOPIC": audit, "GUARD_DELETIONS_TOPIC": deletions,
             "GUARD_AUDIT_RETENTION_MS": str(8 * YEAR_MS)}
    settings = Settings(**admin_kafka_settings(), kafka_bootstrap=bootstrap, audit_topic=audit,
                        deletions_topic=deletions, audit_retention_ms=8 * YEAR_MS)
    assert [c.ok for c in check_evidence_topics(admin, settings)] == [False, False]
    worker = GuardProcess(stack, worker_id=audit, group_id=audit, log_dir=tmp_path,
                          extra_env=extra).start(from_end=True)
    try:
        deadline = time.monotonic() + 60
        while deletions not in admin.list_topics(timeout=10).topics or \
                topic_configs(admin, [audit])[audit]["retention.ms"] != str(8 * YEAR_MS):
            assert worker.alive(), worker.log()
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.5)
        configs = topic_configs(admin, [audit, deletions])
        assert configs[deletions]["retention.ms"] == str(10 * YEAR_MS)
        for name in (audit, deletions):
            assert configs[name]["retention.bytes"] == "-1" and configs[name]["cleanup.policy"] == "delete"
        assert f"{audit}: raised retention.ms 7 days -> 8.0 years" in worker.log()
        checks = check_evidence_topics(admin, settings)
        assert all(c.ok for c in checks), [c.line() for c in checks]
    finally:
        worker.stop()


def test_an_operators_longer_retention_is_kept_and_min_insync_raised(stack: dict[str, str],
                                                                     topics: tuple[str, str]) -> None:
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    admin = AdminClient(kafka_conf(bootstrap))
    audit, deletions = topics
    futures = admin.create_topics([
        NewTopic(audit, 3, 1, config={"retention.ms": "-1"}),
        NewTopic(deletions, 3, 1, config={"retention.ms": str(WEEK_MS), "cleanup.policy": "compact",
                                          "retention.bytes": "1048576"})])
    for fut in futures.values():
        fut.result(timeout=30)
    settings = Settings(**admin_kafka_settings(), kafka_bootstrap=bootstrap, audit_topic=audit,
                        deletions_topic=deletions, evidence_min_insync_replicas=2)
    changes = prepare_evidence_topics(admin, settings, 3)
    assert set(changes) == {
        f"{audit}: raised min.insync.replicas 1 -> 2",
        f"{deletions}: raised retention.ms 7 days -> 10.0 years, retention.bytes 1048576 -> -1, "
        f"cleanup.policy compact -> delete, min.insync.replicas 1 -> 2"}
    configs = topic_configs(admin, [audit, deletions])
    assert configs[audit]["retention.ms"] == "-1"  # forever stays forever
    assert configs[deletions]["cleanup.policy"] == "delete"
    assert configs[audit]["min.insync.replicas"] == configs[deletions]["min.insync.replicas"] == "2"
    assert prepare_evidence_topics(admin, settings, 3) == []  # idempotent


def test_guard_doctor_fails_on_a_week_long_evidence_topic_and_passes_otherwise(stack: dict[str, str],
                                                                               topics: tuple[str, str]) -> None:
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    admin = AdminClient(kafka_conf(bootstrap))
    audit, deletions = topics
    _week_topic(admin, audit)
    _week_topic(admin, deletions)
    env = {**os.environ, **stack, "GUARD_AUDIT_TOPIC": audit, "GUARD_DELETIONS_TOPIC": deletions}
    run = subprocess.run([*GUARD, "doctor", "--settle", "5"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"FAIL  retention of {audit}: retention.ms {WEEK_MS} < {7 * YEAR_MS}" in run.stdout
    assert f"FAIL  retention of {deletions}: retention.ms {WEEK_MS} < {10 * YEAR_MS}" in run.stdout
    assert "do: restart a guard worker" in run.stdout
    # what a worker does at start fixes it, and the whole doctor passes on the stack
    prepare_evidence_topics(admin, Settings(**admin_kafka_settings(), kafka_bootstrap=bootstrap, audit_topic=audit,
                                            deletions_topic=deletions), 3)
    prepare_evidence_topics(admin, Settings(**admin_kafka_settings(), kafka_bootstrap=bootstrap), 3)
    run = subprocess.run([*GUARD, "doctor", "--settle", "5"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"ok    retention of {audit}: 7.0 years" in run.stdout
