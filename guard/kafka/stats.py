"""What the worker counts: totals of committed work (`Stats`) and the open batch's counters, which move
into the totals only when the batch's transaction commits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from guard.pipeline.sanitizer import NativeRun, Outcome


@dataclass
class Stats:
    """Totals of committed work (the demo's summary and the metrics read the same numbers).

    Counts move from the open batch into these totals only when its transaction commits, so an aborted
    and reprocessed batch is never counted twice.
    """

    events_in: int = 0
    records_out: int = 0
    transactions: int = 0
    aborts: int = 0
    #: Data subjects found erased when a transaction that sealed their data was about to commit (aborted).
    erased_during_txn: int = 0
    #: Deletion confirmations re-emitted after a crash left them pending.
    confirmations_redelivered: int = 0
    #: Times a partition was held back at a delete waiting for its attribution message (docs/policy.md).
    attribution_waits: int = 0
    #: Rewinds (seeks back) the consumer did not carry out, caught by `RewindCheck` and repaired by rebuilding
    #: the clients (seen around broker restarts: the fetch went on from where it was).
    lost_rewinds: int = 0
    #: Times the consumer had no member id for several session timeouts and the clients were rebuilt
    #: (`guard.kafka.membership`; seen once after a broker restart: a consumer that never rejoined).
    membership_rebuilds: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    fields_by_class: dict[str, int] = field(default_factory=dict)
    dlq_reasons: dict[str, int] = field(default_factory=dict)

    def merge(self, batch: BatchCounters) -> None:
        self.events_in += batch.events
        self.records_out += batch.records_out
        self.transactions += 1
        for (_, decision), n in batch.by_table_decision.items():
            self.decisions[decision] = self.decisions.get(decision, 0) + n
        for cls, n in batch.fields.items():
            self.fields_by_class[cls] = self.fields_by_class.get(cls, 0) + n
        for reason, n in batch.dlq.items():
            self.dlq_reasons[reason] = self.dlq_reasons.get(reason, 0) + n


@dataclass
class BatchCounters:
    """What the open transaction has done so far.

    `add` runs per event, so it only counts outcome shapes (table, decision, class-count map); the
    per-table and per-class totals are summed from the shapes once, at commit.
    """

    events: int = 0
    records_out: int = 0
    dlq: dict[str, int] = field(default_factory=dict)
    timestamps_ms: list[int] = field(default_factory=list)
    #: (table, decision, id of the outcome's class counts) -> events; the maps themselves in `_classes`.
    _shapes: dict[tuple[str, str, int], int] = field(default_factory=dict)
    _classes: dict[int, Mapping[str, int]] = field(default_factory=dict)

    def add(self, outcome: Outcome, timestamp_ms: int) -> None:
        self.events += 1
        self.records_out += len(outcome.records)
        self._add_shape(outcome.table or "", outcome.decision, outcome.classes, 1)
        if outcome.dlq_reason:
            self.dlq[outcome.dlq_reason] = self.dlq.get(outcome.dlq_reason, 0) + 1
        self.timestamps_ms.append(timestamp_ms)

    def add_run(self, run: NativeRun) -> None:
        """Count a native run's events (all protected, each with a sanitized and an audit record) and the
        transaction facts it added."""
        for table, classes, n in run.shapes:
            self.events += n
            self.records_out += n * run.RECORDS_PER_EVENT
            self._add_shape(table, "protected", classes, n)
        self.records_out += run.facts
        self.timestamps_ms.extend(run.timestamps)

    def _add_shape(self, table: str, decision: str, classes: Mapping[str, int], events: int) -> None:
        shape = (table, decision, id(classes))
        n = self._shapes.get(shape)
        if n is None:
            self._shapes[shape] = events
            self._classes[id(classes)] = classes  # held, so the id can't be reused within the batch
        else:
            self._shapes[shape] = n + events

    @property
    def by_table_decision(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for (table, decision, _), n in self._shapes.items():
            out[(table, decision)] = out.get((table, decision), 0) + n
        return out

    @property
    def fields(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, _, classes_id), n in self._shapes.items():
            for cls, count in self._classes[classes_id].items():
                out[cls] = out.get(cls, 0) + count * n
        return out
