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
from guard.errors import DecodeError
from guard.keys.manager import KeyManager
from guard.records.encoders import MEMO_MAX_CHARS


class Planner:
    """Table plans, data-subject tokens and output topics, each cached."""

    def __init__(self, settings: Settings, keys: KeyManager, catalog: Catalog) -> None:
        self.settings = settings
        self.keys = keys
        self.classifier = Classifier(catalog)
        #: Subject id value -> subject token (a memo of customers' ids: emptied with the value caches).
        self.subject_tokens: dict[Any, str] = {}
        self._out_topics: dict[str, str] = {}

    def subject(self, plan: TablePlan, row: Mapping[str, Any], schema_table: str, row_key: bytes | None,
                where: tuple[str, int, int] | None = None) -> str:
        """The token of the data subject whose key seals this row (image).

        A row whose subject column holds a usable id (`is_subject_id`) belongs to that person. A row
        without one (a null or unusable id, or a table with no subject column) is its own data subject:
        a per-row token of (branch, table, row key), so its key is erased with the row (its delete) or by
        retention, and never shared with other rows (docs/keys.md, "Rows without a data subject").
        """
        person = self.person_subject(plan, row, schema_table)
        return person if person is not None else self.row_subject(schema_table, row_key, where)

    def person_subject(self, plan: TablePlan, row: Mapping[str, Any], schema_table: str) -> str | None:
        """The person's token if the row's subject column holds a usable id, else None."""
        value = row.get(plan.subject_column) if plan.subject_column else None
        return self.subject_for(value, schema_table) if is_subject_id(value) else None

    def row_subject(self, schema_table: str, row_key: bytes | None, where: tuple[str, int, int] | None = None) -> str:
        """The per-row subject of a row without a data subject: of its (sanitized) Kafka key.

        A row without a Kafka key either (a table without a primary key, an offline run) is keyed per
        change, by where the change was read (raw topic, partition, offset): its key is erased by retention.
        """
        if row_key:
            return self.keys.row_subject_token(self.settings.branch, schema_table, row_key)
        if where is None:
            raise DecodeError(
                "no_data_subject",
                f"a row of {schema_table} names no data subject (its subject column is null, unusable or absent) "
                "and has no primary key to key it by: give the table a primary key, or a subject column in "
                "schemas/catalog.toml")
        topic, partition, offset = where
        # A leading 0x00 never starts a sanitized key (JSON), so a change's token never equals a row's.
        return self.keys.row_subject_token(self.settings.branch, schema_table,
                                           b"\x00change\x00" + f"{topic}\x00{partition}\x00{offset}".encode())

    def subject_for(self, subject_value: Any, schema_table: str) -> str:
        """The data subject's token of a usable id value (`is_subject_id`) of its id column."""
        if not is_subject_id(subject_value):
            raise ValueError("not a usable data-subject id")  # the native path declines such rows first
        subject = self.subject_tokens.get(subject_value)
        if subject is None:
            subject = self.keys.subject_token(self.settings.branch, subject_value)
            if type(subject_value) is int or len(subject_value) <= MEMO_MAX_CHARS:  # long ids: not kept whole
                if len(self.subject_tokens) > 200_000:
                    self.subject_tokens.clear()
                self.subject_tokens[subject_value] = subject
        return subject

    def sanitized_topic(self, topic: str) -> str:
        """Where a raw topic's sanitized records go (cached: this runs per event)."""
        out_topic = self._out_topics.get(topic)
        if out_topic is None:
            out_topic = self._out_topics[topic] = self.settings.sanitized_prefix + topic
        return out_topic


def is_subject_id(value: Any) -> bool:
    """Whether a subject column's value names a person: an integer (not a boolean) or a non-empty string.

    Anything else (null, empty, a boolean, a float, a nested value) is unrecognised: the row is then its
    own data subject (`Planner.row_subject`), never a key shared by many rows.
    """
    return (type(value) is int) or (type(value) is str and value != "")
