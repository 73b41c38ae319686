"""Retention and replication of the evidence topics (guard.audit, guard.deletions): settings and the
comparison the worker and `guard doctor` make (issue 13 item 8). The Kafka side is tested on the stack."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from guard.config import Settings, load_settings
from guard.errors import ConfigError
from guard.kafka.evidence import EvidencePolicy, describe_ms, evidence_policies, prepare_evidence_topics, shortfalls

YEAR_MS = 365 * 86_400_000


def test_defaults_are_years_and_deletions_outlast_audit() -> None:
    audit, deletions = evidence_policies(Settings())
    assert (audit.topic, audit.retention_ms) == ("guard.audit", 7 * YEAR_MS)
    assert (deletions.topic, deletions.retention_ms) == ("guard.deletions", 10 * YEAR_MS)
    assert audit.replication_factor == deletions.replication_factor == -1  # the cluster default
    assert audit.create_config() == {"retention.ms": str(7 * YEAR_MS), "retention.bytes": "-1",
                                     "cleanup.policy": "delete"}


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_AUDIT_RETENTION_MS", str(3 * YEAR_MS))
    monkeypatch.setenv("GUARD_EVIDENCE_MIN_INSYNC_REPLICAS", "2")
    monkeypatch.setenv("GUARD_EVIDENCE_REPLICATION_FACTOR", "3")
    audit, _ = evidence_policies(load_settings(None))
    assert audit == EvidencePolicy("guard.audit", 3 * YEAR_MS, 3, 2)
    assert audit.create_config()["min.insync.replicas"] == "2"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"deletions_retention_ms": YEAR_MS}, "deletions_retention_ms .* is shorter"),
    ({"audit_retention_ms": -1}, "deletions_retention_ms .* is shorter"),  # audit forever, deletions not
    ({"audit_retention_ms": 0}, "audit_retention_ms must be"),
    ({"deletions_retention_ms": -5}, "deletions_retention_ms must be"),
    ({"evidence_replication_factor": 0}, "evidence_replication_factor"),
    ({"evidence_min_insync_replicas": -1}, "evidence_min_insync_replicas"),
])
def test_settings_that_would_lose_evidence_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evidence_policies(Settings(**overrides))  # type: ignore[arg-type]


def test_forever_is_longer_than_anything() -> None:
    audit, deletions = evidence_policies(Settings(audit_retention_ms=-1, deletions_retention_ms=-1))
    assert shortfalls(audit, {"retention.ms": "-1"}) == {}
    assert shortfalls(audit, {"retention.ms": str(100 * YEAR_MS)}) == {"retention.ms": (str(100 * YEAR_MS), "-1")}


def test_the_broker_default_week_is_a_shortfall_and_longer_is_kept() -> None:
    audit = EvidencePolicy("guard.audit", 7 * YEAR_MS, -1, 0)
    assert shortfalls(audit, {"retention.ms": "604800000", "retention.bytes": "-1", "cleanup.policy": "delete"}) == {
        "retention.ms": ("604800000", str(7 * YEAR_MS))}
    # nothing is ever lowered: an operator's longer retention, or forever, passes
    assert shortfalls(audit, {"retention.ms": str(20 * YEAR_MS)}) == {}
    assert shortfalls(audit, {"retention.ms": "-1"}) == {}


def test_size_limits_compaction_and_weak_isr_are_shortfalls() -> None:
    policy = EvidencePolicy("guard.audit", YEAR_MS, 3, 2)
    low = shortfalls(policy, {"retention.ms": str(YEAR_MS), "retention.bytes": "1073741824",
                              "cleanup.policy": "compact", "min.insync.replicas": "1"})
    assert low == {"retention.bytes": ("1073741824", "-1"), "cleanup.policy": ("compact", "delete"),
                   "min.insync.replicas": ("1", "2")}
    assert shortfalls(policy, {"retention.ms": str(YEAR_MS), "min.insync.replicas": "3"}) == {}


def test_durations_read_as_people_say_them() -> None:
    assert describe_ms(7 * YEAR_MS) == "7.0 years"
    assert describe_ms(604800000) == "7 days"
    assert describe_ms(-1) == "forever"


class _LaggingBroker:
    """An admin client whose broker serves an alteration only after `lag` more describes, as a KRaft broker
    does while it has not yet applied the controller's metadata record (pure logic: the stack test meets
    the real lag only now and then)."""

    def __init__(self, configs: dict[str, dict[str, str]], lag: int) -> None:
        self.served = {t: dict(c) for t, c in configs.items()}
        self.pending: dict[str, dict[str, str]] = {}
        self.lag, self.describes_since_alter = lag, 0

    def list_topics(self, timeout: float) -> SimpleNamespace:
        partition = SimpleNamespace(replicas=[1])
        return SimpleNamespace(topics={t: SimpleNamespace(error=None, partitions={0: partition})
                                       for t in self.served})

    def describe_configs(self, resources: list, request_timeout: float) -> dict:
        self.describes_since_alter += 1
        if self.pending and self.describes_since_alter > self.lag:
            for topic, changes in self.pending.items():
                self.served[topic].update(changes)
            self.pending = {}
        return {r: _done({n: SimpleNamespace(value=v) for n, v in self.served[r.name].items()}) for r in resources}

    def incremental_alter_configs(self, resources: list) -> dict:
        for r in resources:
            self.pending.setdefault(r.name, {}).update({e.name: e.value for e in r.incremental_configs})
        self.describes_since_alter = 0
        return {r: _done(None) for r in resources}


def _done(value: object) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def test_a_raise_returns_only_once_the_broker_serves_it() -> None:
    week = {"retention.ms": str(7 * 86_400_000), "retention.bytes": "-1", "cleanup.policy": "compact"}
    admin = _LaggingBroker({"guard.audit": dict(week), "guard.deletions": dict(week)}, lag=3)
    changes = prepare_evidence_topics(admin, Settings(), 3)  # type: ignore[arg-type]
    assert len(changes) == 2
    assert admin.pending == {}  # what the caller reads next is the raised topic, not the old one
    for config in admin.served.values():
        assert config["cleanup.policy"] == "delete" and config["retention.bytes"] == "-1"
