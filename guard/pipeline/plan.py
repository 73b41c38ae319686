"""The plan stage: which table plan an event's row follows, whose data it is, and where it goes.

The table plan (`guard.classify.plans.Classifier`, cached per table and column layout) says what happens
to each column; the data subject's token names the key that seals it; the sanitized topic is where the
result is produced. All three are cached, because they are asked for on every event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guard.classify.catalog import Catalog
from guard.classify.plans import Classifier, TablePlan
from guard.config import Settings
from guard.keys.manager import KeyManager


class Planner:
    """Table plans, data-subject tokens and output topics, each cached."""

    def __init__(self, settings: Settings, keys: KeyManager, catalog: Catalog) -> None:
        self.settings = settings
        self.keys = keys
        self.classifier = Classifier(catalog)
        #: Subject id value -> subject token (a memo of customers' ids: emptied with the value caches).
        self.subject_tokens: dict[Any, str] = {}
        self._out_topics: dict[str, str] = {}

    def subject(self, plan: TablePlan, row: Mapping[str, Any], schema_table: str) -> str:
        return self.subject_for(row.get(plan.subject_column) if plan.subject_column else None, schema_table)

    def subject_for(self, subject_value: Any, schema_table: str) -> str:
        """The data subject's token: of its id column's value, or of the table for tables without one."""
        subject_id = subject_value if subject_value is not None else f"table:{schema_table}"
        subject = self.subject_tokens.get(subject_id)
        if subject is None:
            subject = self.keys.subject_token(self.settings.branch, subject_id)
            if len(self.subject_tokens) > 200_000:
                self.subject_tokens.clear()
            self.subject_tokens[subject_id] = subject
        return subject

    def sanitized_topic(self, topic: str) -> str:
        """Where a raw topic's sanitized records go (cached: this runs per event)."""
        out_topic = self._out_topics.get(topic)
        if out_topic is None:
            out_topic = self._out_topics[topic] = self.settings.sanitized_prefix + topic
        return out_topic
