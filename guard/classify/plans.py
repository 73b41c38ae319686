"""Turning a table's columns into a protection plan, once per table shape rather than once per event.

A plan says, for every column of a row of one table: pass it in clear, seal it (with an optional masked
display form and blind index), hash it, or drop it. Catalogued columns follow the catalog. Columns the
catalog does not know are **encrypted whatever the detectors say** (fail closed; or dropped/hashed per
the catalog's `unknown_column_action`) and get **no display form**: the detectors only decide how the
drift alert describes them. A mask chosen from a column name or one sampled value would be applied to
every later value of the column, whatever it holds (free text in `remark` would show its first and last
characters). The plan is cached by the exact column list of the row, so the per-event cost of
classification is one dictionary lookup.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guard.classify.catalog import Action, Catalog, ColumnPolicy, OnDelete, TablePolicy
from guard.classify.detectors import detect_column

#: Column names taken as the data-subject identifier of tables the catalog does not know.
SUBJECT_COLUMN_GUESSES = ("customer_id", "cust_id", "customer_no", "cust_no", "client_id", "khh", "kh_id")


@dataclass(frozen=True, slots=True)
class TablePlan:
    schema_table: str
    columns: tuple[str, ...]
    subject_column: str | None
    clear: tuple[str, ...]
    sealed: tuple[str, ...]
    masks: tuple[tuple[str, str], ...]
    index: tuple[str, ...]
    hashed: tuple[str, ...]
    dropped: tuple[str, ...]
    policies: Mapping[str, ColumnPolicy]
    #: Columns protected by the fail-closed default because the catalog does not know them.
    unclassified: tuple[ColumnPolicy, ...]
    #: Counts per JR/T 0171 class of the columns this plan protects (for audit and metrics).
    class_counts: Mapping[str, int] = field(default_factory=dict)
    #: True when the table is the root of its data subjects (a delete of its row erases the subject).
    subject_root: bool = False
    #: Seconds a data subject's data in this table is kept after the relationship ended (PIPL Art. 19/47).
    retention_s: int = 5 * 365 * 86_400
    #: Root tables: what a delete of a row means (None: not configured; audited, no erasure).
    on_delete: OnDelete | None = None
    #: Root tables: the column saying when the relationship ended (its events take the Python path).
    relationship_end_column: str | None = None


class Classifier:
    """Builds and caches table plans from the catalog and, for unknown columns, the detectors."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._plans: dict[tuple[str, tuple[str, ...]], TablePlan] = {}

    def plan(self, schema_table: str, row: Mapping[str, Any]) -> TablePlan:
        key = (schema_table, tuple(row))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(schema_table, row)
            self._plans[key] = plan
        return plan

    def key_policy(self, schema_table: str, column: str) -> ColumnPolicy | None:
        return self.catalog.column(schema_table, column)

    def _build(self, schema_table: str, row: Mapping[str, Any]) -> TablePlan:
        table = self.catalog.table(schema_table)
        policies: dict[str, ColumnPolicy] = {}
        unclassified: list[ColumnPolicy] = []
        for column, value in row.items():
            policy = self.catalog.column(schema_table, column) if table else None
            if policy is None:
                policy = infer_policy(column, value, self.catalog.defaults.unknown_column_action)
                unclassified.append(policy)
            policies[column] = policy
        subject = table.subject_column if table else None
        if subject is None or subject not in row:
            subject = next((c for c in SUBJECT_COLUMN_GUESSES if c in row), None)
        classes = Counter(p.data_class for p in policies.values() if p.action is not Action.CLEAR)
        return TablePlan(
            schema_table=schema_table,
            columns=tuple(row),
            subject_column=subject,
            clear=tuple(c for c, p in policies.items() if p.action is Action.CLEAR),
            sealed=tuple(c for c, p in policies.items() if p.action is Action.ENCRYPT),
            masks=tuple((c, p.mask) for c, p in policies.items() if p.action is Action.ENCRYPT and p.mask),
            index=tuple(c for c, p in policies.items() if p.action is Action.ENCRYPT and p.index),
            hashed=tuple(c for c, p in policies.items() if p.action is Action.HASH),
            dropped=tuple(c for c, p in policies.items() if p.action is Action.DROP),
            policies=policies,
            unclassified=tuple(unclassified),
            class_counts=dict(classes),
            subject_root=bool(table and table.subject_root),
            retention_s=self._retention_days(table, classes) * 86_400,
            on_delete=table.on_delete if table else None,
            relationship_end_column=table.relationship_end_column if table else None,
        )

    def _retention_days(self, table: TablePolicy | None, classes: Counter[str]) -> int:
        """The table's retention, else the longest per-class default among the classes it protects."""
        if table is not None and table.retention_days is not None:
            return table.retention_days
        per_class = self.catalog.defaults.retention_days
        days = [per_class[c] for c in classes if c in per_class]
        return max(days) if days else per_class.get("C2", 5 * 365)


def infer_policy(column: str, sample: Any, default: Action = Action.ENCRYPT) -> ColumnPolicy:
    """Fail-closed policy for a column the catalog does not know, described by what the detectors see.

    `default` is the catalog's `unknown_column_action` (encrypt, drop or hash; never clear). Detected
    authentication secrets (C3) are always dropped. The policy never has a display mask nor a blind
    index: what the detectors saw describes the column in the drift alert, nothing more.
    """
    if default is Action.CLEAR:
        default = Action.ENCRYPT
    detection = detect_column(column, [sample] if sample is not None else [])
    if detection is None:
        return ColumnPolicy(
            name=column,
            data_class="C2",
            category="unknown",
            sensitive=False,
            action=default,
            mask=None,
            index=False,
            detected_by="no detector matched; encrypted by default (fail closed)",
        )
    action = Action.DROP if detection.data_class == "C3" else default
    return ColumnPolicy(
        name=column,
        data_class=detection.data_class if detection.data_class != "C1" else "C2",
        category=detection.category,
        sensitive=detection.sensitive,
        action=action,
        mask=None,
        index=False,
        detected_by=f"{detection.kind}: {detection.reason}",
    )
