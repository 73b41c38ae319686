"""The topics the checks look at: the output partitions a worker writes, the raw topics it reads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.kafka.hanging import Partition
from guard.kafka.partitioning import group_offsets_partition


def output_partitions(admin: AdminClient, settings: Settings) -> list[Partition]:
    """The guard's output partitions that exist (guard.* and sanitized topics) and its group's offsets."""
    topics = admin.list_topics(timeout=10).topics
    named = {settings.audit_topic, settings.anomalies_topic, settings.deletions_topic, settings.dlq_topic,
             settings.facts_topic}
    out = [(name, p) for name, meta in topics.items() if meta.error is None
           and (name in named or name.startswith(settings.sanitized_prefix)) for p in meta.partitions]
    offsets = topics.get("__consumer_offsets")
    if offsets is not None and offsets.partitions:
        out.append(("__consumer_offsets", group_offsets_partition(settings.group_id, len(offsets.partitions))))
    return sorted(out)


def raw_topics(topics: Mapping[str, Any], settings: Settings) -> list[str]:
    """The raw topics the guard's workers subscribe to, sorted, of a cluster's topic metadata."""
    pattern = re.compile(settings.raw_topic_pattern)
    return sorted(t for t, meta in topics.items() if pattern.match(t) and meta.error is None)
