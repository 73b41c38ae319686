"""Proof that a rewind happened: the consumer's next record of a rewound partition must be one it skipped back over.

The runner rewinds partitions with `Consumer.seek()` in three places: an abort (back to the batch's first
records), a replaced producer (back to the group's committed offsets) and a delete waiting for its
attribution message (back to the delete). `seek()` is asynchronous, and its effect is not guaranteed:
around a broker restart (leader change, offset validation) the fetcher was seen to go on from where it
was, so the records between the seek's target and the old position were never fetched again, while the
ones after them were processed and committed. That is a silent loss (the broker-outage reliability test
found a delete and its tombstone skipped that way).

So every seek is checked, not trusted. When a partition is rewound to offset `sought`, the runner knows
a record at some `known` offset >= `sought` that it is going back over (the batch's first record there, or
the held delete itself). If the seek happened, the next record fetched from that partition is at or
before `known` (offsets may have gaps: transaction markers, compaction, but `known` itself exists). A
next record past `known`, or none at all within `CONFIRM_S`, means the rewind did not take:
`RewindLostError`, on which the runner rebuilds its clients, so the partition resumes from the group's
committed offsets (nothing of the open transaction was committed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: How long a rewound partition may fetch nothing before the rewind is called lost. Generous: after a
#: broker restart fetching resumes within seconds to tens of seconds, and a false alarm only costs a
#: rebuild of the clients.
CONFIRM_S = 60.0


class RewindLostError(Exception):
    """A rewound partition's next record shows the seek did not happen (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    sought: int
    known: int
    at: float


class RewindCheck:
    """The rewinds not yet confirmed by a fetched record, per partition."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: dict[tuple[str, int], _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def expect(self, topic: str, partition: int, sought: int, known: int) -> None:
        """`partition` was sought to `sought`; a record at `known` (>= sought) is known to exist after it."""
        self._pending[(topic, partition)] = _Pending(sought, max(sought, known), self._clock())

    def confirm(self, records: Iterable[tuple[object, str, int, int, object]]) -> None:
        """Check a fetched batch (runner tuples: message, topic, partition, offset, value) against the pending
        rewinds; the first record of a rewound partition confirms its rewind or raises `RewindLostError`."""
        pending = self._pending
        for _, topic, partition, offset, _ in records:
            expected = pending.pop((topic, partition), None)
            if expected is not None and offset > expected.known:
                raise RewindLostError(
                    f"{topic}[{partition}] was rewound to offset {expected.sought}, but the next record fetched "
                    f"is at {offset}, past the record at {expected.known} it went back over")
            if not pending:
                return

    def check_overdue(self) -> None:
        """Raise `RewindLostError` for a rewound partition that has fetched nothing for `CONFIRM_S`."""
        now = self._clock()
        for (topic, partition), expected in self._pending.items():
            if now - expected.at > CONFIRM_S:
                raise RewindLostError(f"{topic}[{partition}] was rewound to offset {expected.sought} "
                                      f"{now - expected.at:.0f} s ago and has fetched nothing since")

    def forget(self, partitions: Iterable[tuple[str, int]] | None = None) -> None:
        """Drop the pending rewinds of `partitions` (None: all): they resume from the committed offsets."""
        if partitions is None:
            self._pending.clear()
            return
        for tp in partitions:
            self._pending.pop(tp, None)
