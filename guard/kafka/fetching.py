"""Assigned partitions the consumer never starts fetching: found, alerted once, never silent.

A consumer given a partition first asks the group coordinator for the group's committed offset
(OffsetFetch; a `read_committed` consumer asks with `require_stable`) and only then starts fetching. While
the coordinator holds offsets for the group in a transaction that has not ended, it answers
`UNSTABLE_OFFSET_COMMIT`, and librdkafka asks again, without end and without an error: the consumer is a
member of its group, holds its partitions and reads nothing. That is normal for as long as a transaction
can stay open (the coordinator aborts one older than its transaction timeout). It was once seen to last
longer: after a graceful broker restart a worker rebuilt its clients, joined, got its partitions and read
nothing for 106 s, with no open transaction in the log (docs/reliability.md, "A worker in its group that
read nothing after a graceful broker restart"). The membership watch saw a member (`guard.kafka.membership`),
the hanging-transaction watch no last stable offset behind (`guard.kafka.hanging`): nobody said anything.

How it is detected: librdkafka's statistics give each partition's `fetch_state`, and a partition whose
fetcher runs is `active`, also when it is empty (a seek or a leader change may make it wait for a moment,
far below the limit); one still waiting for its committed offset is not (`none` for a new consumer,
`stopped` for one given the partition again: checked on the stack). `NotFetchingWatch` times each
assigned partition that is not `active`; when one has stayed so for longer than `limit_s`
(`Settings.stuck_after_s`, as for hanging transactions: no transaction of a working producer stays open
longer), the worker logs an error, sends one critical alert (`alert_record`) and publishes the metric.
Cached watermarks would not tell: librdkafka keeps them when the same consumer is given a partition again
(checked on the stack).

The watch sees, it does not repair: in the case seen, rebuilding the clients did not help, and reading the
committed offsets without `require_stable` would give older ones and decide records twice. The alert's
`suggested_action` says what does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from guard.kafka.side_alerts import critical_alert

#: librdkafka's `fetch_state` of a partition whose fetcher runs (statistics, `topics.*.partitions.*`).
ACTIVE = "active"

#: Namespace of the alert ids: the same consumer (member id) not fetching the same partitions gets one id.
_ALERT_NAMESPACE = uuid.UUID("2a4f6c0e-93d1-4b6e-8f0a-51c7d2e9b8f3")

Partition = tuple[str, int]


def fetch_states(stats: Mapping[str, Any]) -> dict[Partition, str]:
    """Each partition's `fetch_state` in a consumer's parsed librdkafka statistics."""
    states: dict[Partition, str] = {}
    for topic, tstats in (stats.get("topics") or {}).items():
        for pid, pstats in (tstats.get("partitions") or {}).items():
            state = pstats.get("fetch_state") if isinstance(pstats, dict) else None
            if pid != "-1" and isinstance(state, str):
                states[(topic, int(pid))] = state
    return states


@dataclass(frozen=True)
class NotFetching:
    """Assigned partitions that have not fetched for longer than the limit, with their states then."""

    states: tuple[tuple[Partition, str], ...]
    for_s: float

    @property
    def partitions(self) -> list[str]:
        return [f"{topic}[{partition}]" for (topic, partition), _ in self.states]

    def describe(self) -> str:
        states = ", ".join(f"{topic}[{partition}] {state}" for (topic, partition), state in self.states)
        return f"assigned and not fetching for {self.for_s:.0f} s: {states}"


class NotFetchingWatch:
    """Per assigned partition, since when it has not been fetching; reports each consumer's stall once.

    `observe` is called about once a second with the consumer's assignment and the fetch states of its
    latest statistics. It returns a `NotFetching` when a partition not reported yet has gone without
    fetching for longer than `limit_s` (listing every partition then over the limit), else None. A partition
    that starts fetching, or leaves the assignment, starts over; one reported and then fetching is listed by
    `take_resolved`. `restart()` is for a new consumer.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if limit_s <= 0:
            raise ValueError(f"limit_s must be positive, got {limit_s}")
        self.limit_s = limit_s
        self._clock = clock
        self._since: dict[Partition, float] = {}
        self._reported: dict[Partition, float] = {}
        self._resolved: list[tuple[Partition, float]] = []

    def restart(self) -> None:
        """A new consumer: every partition it is given gets a full `limit_s`; nothing is reported yet."""
        self._since.clear()
        self._reported.clear()

    def observe(self, assigned: Iterable[Partition], states: Mapping[Partition, str] | None) -> NotFetching | None:
        now = self._clock()
        if states is None:  # no statistics yet: nothing is known about any fetch
            return None
        waiting: dict[Partition, str] = {}
        for tp in assigned:
            state = states.get(tp, "unknown")
            if state != ACTIVE:
                waiting[tp] = state
        for tp in list(self._since):
            if tp not in waiting:
                del self._since[tp]
        for tp, since in list(self._reported.items()):
            if tp not in waiting:
                self._resolved.append((tp, now - since))
                del self._reported[tp]
        for tp in waiting:
            self._since.setdefault(tp, now)
        over = {tp: state for tp, state in waiting.items() if now - self._since[tp] > self.limit_s}
        if not over or over.keys() <= self._reported.keys():
            return None
        for tp in over:
            self._reported.setdefault(tp, self._since[tp])
        longest = max(now - self._since[tp] for tp in over)
        return NotFetching(tuple(sorted(over.items())), longest)

    def overdue(self) -> dict[str, float]:
        """Partitions reported and still not fetching -> seconds since they were first seen not fetching."""
        now = self._clock()
        return {f"{topic}[{partition}]": now - since for (topic, partition), since in self._reported.items()}

    def take_resolved(self) -> list[tuple[Partition, float]]:
        """Reported partitions that have fetched (or left the assignment) since the last call, with how long
        they went without."""
        resolved, self._resolved = self._resolved, []
        return resolved


def alert_record(finding: NotFetching, *, group: str, offsets_partition: str | None, member_id: str,
                 branch: str, worker: str, now: float) -> tuple[bytes, bytes]:
    """Key and value of the critical alert for one consumer's stall (same shape as the guard's alerts)."""
    scope = f"partitions_not_fetching:{group}:{member_id}:{','.join(finding.partitions)}"
    where = offsets_partition or "the group's __consumer_offsets partition"
    return critical_alert(
        "partitions_not_fetching", scope, _ALERT_NAMESPACE, branch=branch, worker=worker, now=now,
        group=group,
        partitions=finding.partitions,
        fetch_states={p: state for p, (_, state) in zip(finding.partitions, finding.states, strict=True)},
        not_fetching_for_s=round(finding.for_s),
        what=finding.describe(),
        offsets_partition=offsets_partition,
        impact="this worker holds these partitions in its consumer group and reads nothing from them: their "
               "changes wait (none is lost, none is passed unsanitized) and no other worker takes them over "
               "while this one stays in the group",
        suggested_action=f"if a hanging_transaction alert (or `guard doctor`) names {where}, abort that "
                         f"transaction; otherwise the group coordinator may be holding the group's committed offsets "
                         f"as still pending (seen once after a broker restart, docs/reliability.md): restart the "
                         f"broker that leads {where}, or move its leadership; if the partitions' leaders are "
                         f"unreachable, restore them. Restarting the worker did not help in the case seen",
    )
