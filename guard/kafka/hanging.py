"""Hanging transactions on the guard's output partitions: found, alerted, counted, never silent.

A *hanging transaction* is an open transaction on a partition that no transaction coordinator will ever
end. Its first record pins the partition's last stable offset (LSO): every `read_committed` reader of the
partition (downstream systems, security on-call, auditors, the guard's own consumer group when it is
`__consumer_offsets`) stops there for good, without an error.

Why they happen even to a correct producer: Kafka's transaction coordinator skips the commit/abort
marker of a partition that has no leader at the moment it sends the markers ("these partitions are likely
deleted already and hence can be skipped"), then records the transaction as complete. A partition is
leaderless for a moment whenever its only replica's broker is fenced, e.g. when a single-replica broker
restarts after a crash (docs/reliability.md, "Hanging transactions"). Replicated output topics and the
local stack's separate controller make it rare; this module makes sure it is never silent.

How it is detected: the LSO of a partition with an open transaction advances as soon as that
transaction ends, which for any writer happens within its transaction timeout (the coordinator aborts
late ones). A partition whose LSO stays behind its high watermark *at the same offset* for longer than
`limit_s` (the transaction timeout plus the setting `hanging_margin_s`, default 30 s: Kafka's coordinator
looks for timed-out transactions every 10 s) therefore holds a transaction nobody will end. `StuckTracker`
keeps that clock per partition (pure logic, unit-tested); `read_ends` reads both offsets with the Admin
API (`ListOffsets`, one request per isolation level); `HangingWatcher` runs both in a daemon thread of the
worker and reports each hanging partition once: an alert on the anomalies topic, a metric and an error log line.

What to do about one: `guard doctor` names it, and Kafka's transaction tool aborts it
(`python -m guard.stack transactions --abort` on the local stack; `kafka-transactions.sh abort --topic T
--partition P --start-offset LSO` elsewhere). See docs/reliability.md.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from guard.kafka.side_alerts import SideAlerts, critical_alert

log = logging.getLogger("guard.kafka.hanging")

#: Namespace of the alert ids: the same hanging partition at the same LSO always gets the same id, so a
#: restarted worker re-reporting it updates the alert instead of adding one.
_ALERT_NAMESPACE = uuid.UUID("6f1c1f7e-4b1e-4d7e-9a51-6a8e1d0c5b2a")

Partition = tuple[str, int]


@dataclass(frozen=True)
class PartitionEnds:
    """A partition's high watermark and last stable offset at one moment."""

    high_watermark: int
    last_stable: int

    @property
    def unstable(self) -> int:
        """Records a `read_committed` reader can't reach yet."""
        return max(0, self.high_watermark - self.last_stable)


@dataclass(frozen=True)
class Hanging:
    """A partition whose LSO has stood still behind its high watermark for `stuck_s` seconds."""

    topic: str
    partition: int
    last_stable: int
    high_watermark: int
    stuck_s: float

    def describe(self) -> str:
        return (f"{self.topic}[{self.partition}]: last stable offset {self.last_stable} has stood "
                f"{self.stuck_s:.0f} s behind the high watermark {self.high_watermark} "
                f"({self.high_watermark - self.last_stable} records unreadable by read_committed consumers)")

    @property
    def abort_command(self) -> str:
        # the cluster requires TLS + SASL: the tool needs an administrator's client properties
        return (f"kafka-transactions.sh --bootstrap-server <broker> --command-config <admin client properties> "
                f"abort --topic {self.topic} --partition {self.partition} --start-offset {self.last_stable}")


class StuckTracker:
    """Per partition, since when its LSO has stood at the same offset behind the high watermark.

    `observe` is called with fresh ends every few seconds; it returns the partitions stuck for longer
    than `limit_s`. A partition whose LSO moves (or reaches the high watermark) starts over, so a busy
    partition with short transactions is never reported however often it is seen unstable.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: dict[Partition, tuple[int, float]] = {}

    def observe(self, now: float, ends: Mapping[Partition, PartitionEnds]) -> list[Hanging]:
        hanging: list[Hanging] = []
        seen: set[Partition] = set()
        for tp, end in ends.items():
            if end.unstable == 0:
                continue
            seen.add(tp)
            lso, since = self._since.get(tp, (end.last_stable, now))
            if lso != end.last_stable:
                lso, since = end.last_stable, now
            self._since[tp] = (lso, since)
            if now - since > self.limit_s:
                hanging.append(Hanging(tp[0], tp[1], end.last_stable, end.high_watermark, now - since))
        for tp in list(self._since):
            if tp not in seen:
                del self._since[tp]
        return sorted(hanging, key=lambda h: (h.topic, h.partition))

    def pending(self) -> dict[Partition, int]:
        """Partitions currently unstable and being timed, with the LSO they stand at."""
        return {tp: lso for tp, (lso, _) in self._since.items()}


def read_ends(admin: AdminClient, partitions: Iterable[Partition], timeout_s: float = 10.0
              ) -> dict[Partition, PartitionEnds]:
    """High watermark and LSO of each partition (ListOffsets, latest, under both isolation levels)."""
    request = {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions}
    if not request:
        return {}
    offsets: dict[IsolationLevel, dict[Partition, int]] = {}
    for level in (IsolationLevel.READ_UNCOMMITTED, IsolationLevel.READ_COMMITTED):
        futures = admin.list_offsets(request, isolation_level=level, request_timeout=timeout_s)
        offsets[level] = {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
    high, stable = offsets[IsolationLevel.READ_UNCOMMITTED], offsets[IsolationLevel.READ_COMMITTED]
    return {tp: PartitionEnds(high[tp], stable[tp]) for tp in high if tp in stable}


def alert_record(hanging: Hanging, *, branch: str, worker: str, now: float) -> tuple[bytes, bytes]:
    """Key and value of the anomaly alert for one hanging partition (same shape as the guard's alerts)."""
    scope = f"hanging_transaction:{hanging.topic}:{hanging.partition}:{hanging.last_stable}"
    return critical_alert(
        "hanging_transaction", scope, _ALERT_NAMESPACE, branch=branch, worker=worker, now=now,
        topic=hanging.topic,
        partition=hanging.partition,
        last_stable_offset=hanging.last_stable,
        high_watermark=hanging.high_watermark,
        stuck_for_s=round(hanging.stuck_s),
        impact="read_committed consumers of this partition (downstream, on-call, auditors) are stuck at the last "
               "stable offset; if the partition is in __consumer_offsets, the consumer groups stored there can't "
               "fetch their committed offsets",
        suggested_action=f"abort the transaction: {hanging.abort_command} (local stack: "
                         f"`python -m guard.stack transactions --abort`); then check `guard doctor`",
    )


class HangingWatcher:
    """A daemon thread that watches output partitions and reports each hanging one once.

    `partitions()` is called on every round, so output topics created later (a new table's sanitized
    topic) are watched too. Reports go to `report(hanging)`: the worker logs, counts and alerts.
    """

    def __init__(self, admin: AdminClient, partitions: Callable[[], Iterable[Partition]],
                 report: Callable[[list[Hanging]], None], *, limit_s: float, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._admin = admin
        self._partitions = partitions
        self._report = report
        self._tracker = StuckTracker(limit_s)
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hanging-watch", daemon=True)

    def start(self) -> HangingWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[Hanging]:
        return self._tracker.observe(self._clock(), read_ends(self._admin, self._partitions()))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                hanging = self.check_once()
            except (KafkaException, ValueError) as exc:  # the cluster is unreachable: try again next round
                log.debug("hanging-transaction check skipped: %s", exc)
                continue
            try:
                self._report(hanging)
            except Exception:  # noqa: BLE001 - a failed report must not end the watch
                log.exception("reporting hanging transactions failed")


class HangingReporter:
    """Logs, counts and alerts each hanging partition once (per LSO), on a partition readers can reach.

    The alert goes out through the worker's `SideAlerts` (`guard.kafka.side_alerts`): its own idempotent,
    non-transactional producer, since the worker's transactions may be the very thing that is stuck, and a
    partition of the anomalies topic that is not itself hanging.
    """

    def __init__(self, alerts: SideAlerts, *, branch: str, worker: str,
                 on_count: Callable[[list[Hanging]], None]) -> None:
        self._alerts = alerts
        self._branch = branch
        self._worker = worker
        self._on_count = on_count
        self._reported: set[tuple[str, int, int]] = set()

    def __call__(self, hanging: list[Hanging]) -> None:
        self._on_count(hanging)
        current = {(h.topic, h.partition, h.last_stable) for h in hanging}
        self._reported &= current  # a resolved partition is reported again if it ever hangs anew
        self._alerts.hanging({h.partition for h in hanging if h.topic == self._alerts.topic})
        for h in hanging:
            if (h.topic, h.partition, h.last_stable) in self._reported:
                continue
            log.error("hanging transaction on an output partition: %s; abort it with: %s", h.describe(),
                      h.abort_command)
            key, value = alert_record(h, branch=self._branch, worker=self._worker, now=time.time())
            self._alerts.send(key, value)
            self._reported.add((h.topic, h.partition, h.last_stable))
