"""Wiring: the analyzer, its shared state and the topics it reads, from the guard's settings.

Redis is reached through the key store's client (`RedisKeyStore`), so the analyzers use the same
connection settings, credentials (`GUARD_REDIS_PASSWORD_FILE`) and tenant prefix (`bg:{tenant}:`) as the
sanitizer; its keys are under `bg:{tenant}:anomaly:`, inside the guard's Redis ACL patterns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from guard.anomaly.engine import Analyzer
from guard.anomaly.facts import FACTS_TOPIC
from guard.anomaly.rules import RuleConfig
from guard.anomaly.state import AnomalyState
from guard.anomaly.status import StatusSource
from guard.config import Settings
from guard.keys.store import RedisKeyStore


@dataclass(frozen=True)
class AnalyzerTopics:
    """The topics one analyzer reads (roles → names) and writes (alerts)."""

    audit: str
    dlq: str
    anomalies: str
    deletions: str
    facts: str
    #: Sanitized topics the analyzer reads (tokens and clear columns only): customers (contact-detail
    #: changes for the takeover rules) and staff (the principal registry, issue 14).
    contact: tuple[str, ...]

    def roles(self) -> dict[str, str]:
        return {"audit": self.audit, "dlq": self.dlq, "anomalies": self.anomalies, "deletions": self.deletions,
                "facts": self.facts}

    def sources(self) -> list[str]:
        return [self.audit, self.dlq, self.anomalies, self.deletions, self.facts, *self.contact]


def analyzer_topics(settings: Settings) -> AnalyzerTopics:
    """From the settings (`GUARD_FACTS_TOPIC` is `facts_topic`, the one the sanitizer writes transaction facts
    to); `GUARD_CONTACT_TOPICS` (comma-separated) overrides the sanitized topics read (default: the branch's
    customers and staff tables)."""
    contact = os.environ.get("GUARD_CONTACT_TOPICS")
    return AnalyzerTopics(
        audit=settings.audit_topic, dlq=settings.dlq_topic, anomalies=settings.anomalies_topic,
        deletions=settings.deletions_topic, facts=settings.facts_topic or FACTS_TOPIC,
        contact=tuple(t for t in contact.split(",") if t) if contact is not None else
        tuple(settings.sanitized_topic(f"{settings.raw_topic_prefix}.public.{t}") for t in ("customers", "staff")))


def _store(settings: Settings) -> RedisKeyStore:
    return RedisKeyStore(settings.redis_url, settings.tenant, password_file=settings.redis_password_file or None)


def build_analyzer(settings: Settings, rules: RuleConfig | None = None) -> Analyzer:
    """An analyzer over the tenant's shared state; legal holds are read from the key store."""
    store = _store(settings)
    state = AnomalyState(store.client, settings.tenant)
    return Analyzer(state, rules or RuleConfig.load(), is_held=store.is_held)


def status_source(settings: Settings) -> StatusSource:
    """The status page's sources: the tenant's alert state; the sanitizer's and the analyzer's lag."""
    store = _store(settings)
    app_id = os.environ.get("GUARD_ANALYZER_APP_ID", "branchguard-analyzer")
    topics = analyzer_topics(settings)
    return StatusSource(settings, AnomalyState(store.client, settings.tenant), groups=[
        ("sanitizer", settings.group_id, settings.raw_topic_prefix + "."),
        ("analyzer", app_id, topics.facts),
    ])
