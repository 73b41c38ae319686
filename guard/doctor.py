"""`guard doctor`: checks a deployment the way an operator would, one line per check, with what to do.

Each check returns a `Check`; the command prints them and exits non-zero when any failed. Checks talk to
the real components with the guard's own settings, so a pass means the guard itself would get through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.kafka.hanging import COORDINATOR_MARGIN_S, Partition, StuckTracker, group_offsets_partition, read_ends


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, whether it passed, what was seen, and what to do if not."""

    name: str
    ok: bool
    detail: str
    action: str = ""

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text if self.ok or not self.action else f"{text}\n      do: {self.action}"


def output_partitions(admin: AdminClient, settings: Settings) -> list[Partition]:
    """The guard's output partitions that exist (guard.* and sanitized topics) and its group's offsets."""
    topics = admin.list_topics(timeout=10).topics
    named = {settings.audit_topic, settings.anomalies_topic, settings.deletions_topic, settings.dlq_topic}
    out = [(name, p) for name, meta in topics.items() if meta.error is None
           and (name in named or name.startswith(settings.sanitized_prefix)) for p in meta.partitions]
    offsets = topics.get("__consumer_offsets")
    if offsets is not None and offsets.partitions:
        out.append(("__consumer_offsets", group_offsets_partition(settings.group_id, len(offsets.partitions))))
    return sorted(out)


def check_hanging_transactions(admin: AdminClient, settings: Settings, *, settle_s: float | None = None,
                               poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                               sleep: Callable[[float], None] = time.sleep) -> list[Check]:
    """Every output partition's LSO must reach its high watermark or move within the settle time.

    An open transaction of a live writer ends within its transaction timeout, so a partition whose last
    stable offset does not move for that long (plus the coordinator's clean-up margin) is hanging. Most
    runs return at once: nothing is unstable, or the unstable partitions move on the next poll.
    """
    limit = settle_s if settle_s is not None else settings.transaction_timeout_ms / 1000 + COORDINATOR_MARGIN_S
    partitions = output_partitions(admin, settings)
    tracker = StuckTracker(limit)
    start = clock()
    tracker.observe(start, read_ends(admin, partitions))
    while tracker.pending() and clock() - start <= limit:
        sleep(poll_s)
        hanging = tracker.observe(clock(), read_ends(admin, list(tracker.pending())))
        if hanging:
            return [Check("hanging transaction", False, h.describe(),
                          f"abort it: {h.abort_command} (local stack: `python -m guard.stack transactions "
                          f"--abort`); see docs/reliability.md") for h in hanging]
    return [Check("hanging transactions", True, f"none on {len(partitions)} output partitions (last stable "
                                                 "offsets reach the high watermarks or move)")]


def run_checks(settings: Settings, *, settle_s: float | None = None) -> Iterator[Check]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        brokers = admin.list_topics(timeout=10).brokers
    except KafkaException as exc:
        yield Check("kafka", False, f"{settings.kafka_bootstrap} does not answer ({exc.args[0]})",
                    "start the cluster (`guard stack up` locally) or set GUARD_KAFKA_BOOTSTRAP")
        return
    yield Check("kafka", True, f"{settings.kafka_bootstrap} answers ({len(brokers)} broker(s))")
    yield from check_hanging_transactions(admin, settings, settle_s=settle_s)
