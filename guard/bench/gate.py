"""A drain by several workers starts with their group formed (`--workers` above 1, `--scaling`).

Why: the input topics are filled once, before the trials, and each drain is a fresh consumer group reading
them from the start. With one worker that is the drain and nothing else. With several, the workers join
the group one after the other: the first is assigned every partition and drains as fast as it can until the
next one joins, and the rebalance that follows stops every member for a moment. A 2-worker plain drain of
200,000 records measured that way had one worker with 153,680 events and the other with 46,320, and a
second with 2,145 events in it: the figure was the group's joins, and the ratio it gave (0.366 against
~0.20 with one worker) was not the loops' (docs/benchmark.md, round 27).

So a drain by several workers runs on records written after the group is formed:

1. the fresh group's offsets are committed at the input topics' ends before any worker starts (an empty
   group takes plain offset commits), so the workers, once they join, have nothing to read;
2. the workers start, and the bench waits until the group is stable with every worker a member and every
   input partition assigned (the group's description, as `kafka-consumer-groups --describe` reads it);
3. the workload is written again in one Kafka transaction (`topics.fill`): both modes' workers read
   committed records only, so they see none of it until the commit and then all of it at once.

The drain reads from the offsets committed in step 1 up to the transaction's commit marker, the last offset
of each partition it wrote to: a worker's committed position may stop before the marker (it commits the
offset after the last record it handled), so every later wait on a group's progress knows where the bench's
markers are (`BenchContext.markers`, `GroupProgress.ends`).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from guard.bench.common import BenchError, log
from guard.bench.topics import Names, fill
from guard.bench.workers import BenchContext, GroupProgress, WorkerSet
from guard.bench.workload import Workload
from guard.kafka_security import client_config

#: An offset per input (topic, partition).
Offsets = dict[tuple[str, int], int]


@dataclass(frozen=True)
class DrainInput:
    """What a drain reads: where each input partition's committed offset ends up, and how many records."""

    targets: Offsets
    records: int


def _records_per_topic(names: Names, workload: Workload, topics: list[str]) -> dict[str, int]:
    """How many of the workload's records a fill writes to each of `topics`."""
    per_table = Counter(workload.templates[template][0] for template in workload.order)
    per_topic = {names.input(table): n for table, n in per_table.items()}
    return {topic: per_topic.get(topic, 0) for topic in topics}


def _committed_ends(progress: GroupProgress, starts: Offsets, written: dict[str, int],
                    timeout: float = 30.0) -> Offsets:
    """The topics' ends once the fill's transaction is readable, commit markers included.

    The ends a read_committed client is told are the last stable offsets, and the producer's commit returns
    before the transaction's markers are written to the partitions: read at once, the ends were still the
    starts (a drain of 0 records). So read until every topic's new offsets are its records plus a marker
    per partition it wrote to."""
    deadline = time.monotonic() + timeout
    while True:
        ends = progress.stable_ends()
        added = Counter[str]()
        for (t, p), end in ends.items():
            if end > starts[(t, p)]:
                added[t] += end - starts[(t, p)] - 1  # less the partition's commit marker
        if all(added[t] == written[t] for t in progress.topics):
            return ends
        if time.monotonic() > deadline:
            raise BenchError(f"the workload written again was not readable within {timeout:.0f}s "
                             f"(from {starts} to {ends}, records per topic {written})")
        time.sleep(0.05)


def _wait_formed(ctx: BenchContext, workers: WorkerSet, topics: list[str], timeout: float = 60.0) -> float:
    """Block until `workers.group` is stable with `workers.count` members holding every input partition;
    returns how long it took (s)."""
    admin = AdminClient(client_config(ctx.settings))
    wanted = {(t, p) for t in topics for p in range(ctx.partitions)}
    start = time.monotonic()
    state = "not described yet"
    while time.monotonic() - start < timeout:
        workers.check_alive()
        try:
            description = admin.describe_consumer_groups([workers.group], request_timeout=10)[workers.group].result()
        except KafkaException as exc:  # a slow answer (or a group not known yet) is retried until the deadline
            state = f"not described ({type(exc).__name__})"
        else:
            held = [{(tp.topic, tp.partition) for tp in member.assignment.topic_partitions}
                    for member in description.members]
            state = f"{description.state.name}, {len(held)} member(s), {sum(map(len, held))} partition(s) held"
            if (description.state == ConsumerGroupState.STABLE and len(held) == workers.count
                    and all(held) and set().union(*held) == wanted):
                return time.monotonic() - start
        time.sleep(0.1)
    raise BenchError(f"{workers.count} {workers.mode} workers did not form group {workers.group} within "
                     f"{timeout:.0f}s ({state})")


def start_for_drain(ctx: BenchContext, workers: WorkerSet, *, written_again: bool = False) -> DrainInput | None:
    """Start `workers` for a drain of the input; what the drain reads, or None for every record already in
    the input topics (one worker). Several workers, or one with `written_again` (so that it drains the same
    records as several: `--scaling`), drain the workload written again once their group is formed (the
    module's docs)."""
    if workers.count == 1 and not written_again:
        workers.start()
        return None
    topics = ctx.inputs_of(workers.mode)
    if ctx.workload is None:
        raise BenchError("a drain by several workers writes the workload again: the bench context has none")
    # One client for the group's offsets and the topics' ends, open until both are read: a client closed
    # while it still authenticates to the group's coordinator logs a SASL failure.
    progress = GroupProgress.of(ctx, workers)
    try:
        starts = progress.stable_ends()
        progress.commit(starts)
        workers.start()
        formed_s = _wait_formed(ctx, workers, topics)
        rate = fill(client_config(ctx.settings), ctx.names, ctx.workload,
                    transactional_id=f"{ctx.names.prefix}-fill-{uuid.uuid4().hex[:8]}")
        ends = _committed_ends(progress, starts, _records_per_topic(ctx.names, ctx.workload, topics))
    finally:
        progress.close()
    # A partition the transaction wrote to ends with its commit marker, which a committed position need not
    # cover; later waits on the group's progress know it (`GroupProgress.ends`).
    ctx.markers.update({tp: end - 1 for tp, end in ends.items() if end > starts[tp]})
    targets = {tp: end - 1 if end > starts[tp] else end for tp, end in ends.items()}
    records = sum(targets[tp] - starts[tp] for tp in targets)
    log.info("%d %s workers formed their group in %.1fs; the workload written again in one transaction "
             "(%d records of their topics, %.0f/s)", workers.count, workers.mode, formed_s, records, rate)
    return DrainInput(targets, records)
