"""The evidence topics, `guard.audit` and `guard.deletions`: retention in years and replication from settings.

An audit record or a destruction record is evidence (PIPL Art. 56 and 69): it must outlive the data it
speaks for. Left to the broker, these topics got `log.retention.hours` (7 days) and one replica. The worker
therefore creates them with explicit settings (`Settings.audit_retention_ms`, `deletions_retention_ms`,
`evidence_replication_factor`, `evidence_min_insync_replicas`) and, at start, *raises* what an existing
topic has below them (`incremental_alter_configs`): a shorter `retention.ms`, a size limit
(`retention.bytes`), compaction (`cleanup.policy`: the audit records of one partition share a key, so
compaction would keep only the last), a lower `min.insync.replicas`. Raising never deletes a record, and a
worker that only reported the shortfall would keep writing evidence into a topic that deletes it every day
until someone read the report. Nothing is ever lowered: a longer retention an operator set stays. The
replication factor of an existing topic cannot be changed by a config (it takes a partition reassignment):
a shortfall is logged here and reported by `guard doctor`.

If the broker refuses the change (no AlterConfigs permission, say), the worker does not start
(`EvidenceTopicError`): it would otherwise write evidence that expires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from guard.config import Settings
from guard.errors import ConfigError, GuardError

log = logging.getLogger(__name__)

__all__ = [
    "EvidencePolicy",
    "EvidenceTopicError",
    "evidence_policies",
    "prepare_evidence_topics",
    "shortfalls",
    "topic_configs",
]

MS_PER_DAY = 86_400_000
T = TypeVar("T")


class EvidenceTopicError(GuardError):
    """An evidence topic cannot be given the configured retention or replication; says what to do."""


@dataclass(frozen=True)
class EvidencePolicy:
    """What one evidence topic must keep: at least `retention_ms` (-1: forever), on at least
    `replication_factor` replicas (-1: the cluster default, not checked), `min_insync` (0: broker default)."""

    topic: str
    retention_ms: int
    replication_factor: int
    min_insync: int

    def create_config(self) -> dict[str, str]:
        config = {"retention.ms": str(self.retention_ms), "retention.bytes": "-1", "cleanup.policy": "delete"}
        if self.min_insync > 0:
            config["min.insync.replicas"] = str(self.min_insync)
        return config


def _longer_or_equal(a: int, b: int) -> bool:
    """Retention `a` keeps at least as long as `b` (-1, or any negative: forever)."""
    if a < 0:
        return True
    return b >= 0 and a >= b


def describe_ms(ms: int) -> str:
    if ms < 0:
        return "forever"
    days = ms / MS_PER_DAY
    return f"{days / 365:.1f} years" if days >= 365 else f"{days:g} days"


def evidence_policies(settings: Settings) -> list[EvidencePolicy]:
    """The audit and deletions topics' policies; ConfigError on settings that would lose evidence."""
    for name in ("audit_retention_ms", "deletions_retention_ms"):
        value = getattr(settings, name)
        if value == 0 or value < -1:
            raise ConfigError(f"setting {name} must be a positive number of milliseconds or -1 (forever), "
                              f"got {value}")
    if not _longer_or_equal(settings.deletions_retention_ms, settings.audit_retention_ms):
        raise ConfigError(f"deletions_retention_ms ({describe_ms(settings.deletions_retention_ms)}) is shorter "
                          f"than audit_retention_ms ({describe_ms(settings.audit_retention_ms)}): a destruction "
                          f"record must be kept at least as long as the audit records; raise it")
    if settings.evidence_replication_factor == 0 or settings.evidence_replication_factor < -1:
        raise ConfigError("setting evidence_replication_factor must be -1 (the cluster default) or at least 1")
    if settings.evidence_min_insync_replicas < 0:
        raise ConfigError("setting evidence_min_insync_replicas must be 0 (the broker default) or at least 1")
    rf, isr = settings.evidence_replication_factor, settings.evidence_min_insync_replicas
    return [EvidencePolicy(settings.audit_topic, settings.audit_retention_ms, rf, isr),
            EvidencePolicy(settings.deletions_topic, settings.deletions_retention_ms, rf, isr)]


def shortfalls(policy: EvidencePolicy, config: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """What a topic's config has below the policy: {name: (current, wanted)}. Values longer or stronger
    than the policy are not shortfalls (nothing is ever lowered)."""
    out: dict[str, tuple[str, str]] = {}
    current = int(config.get("retention.ms", "604800000"))
    if not _longer_or_equal(current, policy.retention_ms):
        out["retention.ms"] = (str(current), str(policy.retention_ms))
    if int(config.get("retention.bytes", "-1")) >= 0:
        out["retention.bytes"] = (config["retention.bytes"], "-1")
    if config.get("cleanup.policy", "delete") != "delete":
        out["cleanup.policy"] = (config["cleanup.policy"], "delete")
    if policy.min_insync > 0 and int(config.get("min.insync.replicas", "1")) < policy.min_insync:
        out["min.insync.replicas"] = (config.get("min.insync.replicas", "1"), str(policy.min_insync))
    return out


def topic_configs(admin: AdminClient, topics: list[str], timeout: float = 30) -> dict[str, dict[str, str]]:
    """The effective configs (name -> value) of existing topics."""
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics],
                                     request_timeout=timeout)
    return {res.name: {name: str(e.value) for name, e in fut.result(timeout=timeout).items() if e.value is not None}
            for res, fut in futures.items()}


def replication_factors(admin: AdminClient, topics: list[str]) -> dict[str, int]:
    """Replicas of each existing topic (the smallest over its partitions)."""
    md = admin.list_topics(timeout=10).topics
    return {t: min(len(p.replicas) for p in md[t].partitions.values())
            for t in topics if t in md and md[t].error is None and md[t].partitions}


def prepare_evidence_topics(admin: AdminClient, settings: Settings, partitions: int) -> list[str]:
    """Create the evidence topics with their policies, or raise what an existing one has below them.

    Returns one line per change made (also logged). Raises EvidenceTopicError when the broker refuses.
    """
    policies = evidence_policies(settings)
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [p for p in policies if p.topic not in existing]
    # topics created here have the policy already; describing them at once could meet a broker whose
    # metadata has not caught up yet, so only topics that existed (or that another worker just made) are read
    check = [p.topic for p in policies if p.topic in existing]
    if missing:
        futures = admin.create_topics([NewTopic(p.topic, partitions, p.replication_factor, config=p.create_config())
                                       for p in missing])
        for topic, fut in futures.items():
            config = next(p for p in missing if p.topic == topic).create_config()
            try:
                fut.result(timeout=30)
                log.info("created %s with %s", topic, config)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise EvidenceTopicError(f"cannot create evidence topic {topic}: {exc.args[0].str()}; the "
                                             f"guard's principal needs CreateTopics on it (or create it with "
                                             f"{config})") from None
                check.append(topic)
    by_topic = {p.topic: p for p in policies}
    changes: list[str] = []
    try:
        configs = _with_retries(lambda: topic_configs(admin, check) if check else {})
    except KafkaException as exc:
        raise EvidenceTopicError(f"cannot read the configs of {sorted(check)}: {exc.args[0].str()}; the "
                                 f"guard's principal needs DescribeConfigs on them") from None
    for topic, config in configs.items():
        low = shortfalls(by_topic[topic], config)
        if not low:
            continue
        entries = [ConfigEntry(name, wanted, incremental_operation=AlterConfigOpType.SET)
                   for name, (_, wanted) in low.items()]
        resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
        try:
            for fut in admin.incremental_alter_configs([resource]).values():
                fut.result(timeout=30)
        except KafkaException as exc:
            wanted = ",".join(f"{n}={w}" for n, (_, w) in low.items())
            raise EvidenceTopicError(
                f"{topic} keeps less than configured ({_describe(low)}) and the broker refused to raise it: "
                f"{exc.args[0].str()}. Give the guard's principal AlterConfigs on {topic}, or run "
                f"`kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config {wanted}`"
            ) from None
        _await_applied(admin, topic, {name: wanted for name, (_, wanted) in low.items()})
        line = f"{topic}: raised {_describe(low)}"
        log.warning("%s (it kept less than the configured evidence retention)", line)
        changes.append(line)
    for topic, replicas in replication_factors(admin, check).items():
        wanted_rf = by_topic[topic].replication_factor
        if wanted_rf > 0 and replicas < wanted_rf:
            log.error("%s has %d replica(s), fewer than evidence_replication_factor=%d; reassign its partitions "
                      "(kafka-reassign-partitions.sh), a config cannot change it", topic, replicas, wanted_rf)
    return changes


_DENIED = frozenset({"TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "POLICY_VIOLATION"})


def _with_retries(call: Callable[[], T], deadline_s: float = 30.0) -> T:
    """`call()`, retried for up to `deadline_s` on Kafka errors other than a refusal (a broker restarting
    while the worker starts); a refusal or the last error is raised."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].name() in _DENIED or time.monotonic() > deadline:
                raise
            log.info("reading the evidence topics' configs failed (%s); retrying", exc.args[0].str())
            time.sleep(1.0)


def _await_applied(admin: AdminClient, topic: str, wanted: Mapping[str, str], deadline_s: float = 30.0) -> None:
    """Wait until the broker serves `wanted` for `topic`.

    The controller acknowledges an alteration before the broker has applied the metadata record, so a
    describe right after can still show the old value; a caller (a doctor run, a second worker) must not
    see a topic half-raised. Past the deadline the change is still committed: logged, not raised.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            current = topic_configs(admin, [topic]).get(topic, {})
            if all(current.get(name) == value for name, value in wanted.items()):
                return
        except KafkaException as exc:
            if exc.args[0].name() in _DENIED:
                return  # raised but not readable back: the caller's principal lacks DescribeConfigs
        if time.monotonic() > deadline:
            log.warning("%s: the broker does not serve the raised configs yet after %.0f s", topic, deadline_s)
            return
        time.sleep(0.2)


def _describe(low: Mapping[str, tuple[str, str]]) -> str:
    parts = []
    for name, (current, wanted) in low.items():
        if name == "retention.ms":
            parts.append(f"retention.ms {describe_ms(int(current))} -> {describe_ms(int(wanted))}")
        else:
            parts.append(f"{name} {current} -> {wanted}")
    return ", ".join(parts)
