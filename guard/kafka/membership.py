"""Proof that the worker's consumer is in its group: a consumer out of it for too long is rebuilt.

After a broker restart a consumer's session can expire (`SESSTMOUT`: its partitions are *lost*) and
librdkafka then rejoins the group by itself. Once in the reliability tests (docs/reliability.md, "A worker
whose consumer did not come back after a broker restart") it did not: the worker logged its lost partitions
and then nothing for three minutes, no fetch, no error, and its share of the stream waited for as long as
the process lived. Known reports of the same: confluentinc/librdkafka issues 2944 and 3396, consumers stuck
rejoining after their coordinator changed.

A consumer that is a member of its group has a member id (`Consumer.memberid()`), whether it holds
partitions or stands by with none. Without one it is joining: that takes one round trip to the coordinator
(KIP-394: the broker hands out the id at once, even while a rebalance then waits for the other members),
or as long as the coordinator is unreachable. So a worker whose consumer has had no member id for
`limit_s` (several session timeouts) rebuilds its clients (`SanitizerWorker._rebuild_clients`): the new
consumer joins from the group's committed offsets, the new producer fences the old one. During a real
outage longer than that the rebuild waits for the cluster like any other rebuild; a false alarm costs a
rebuild, never a record (nothing is committed without the group's offsets).

A consumer whose subscription matches no existing topic does not join at all (checked on the stack: no member
id for as long as it ran), and that is no fault: a worker deployed before Debezium has created the branch's
topics waits for them. So before a rebuild the worker asks for the cluster's topics (`subscription_matches`);
with nothing to read it starts counting again instead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

#: How many session timeouts without a member id make a consumer stuck (`MembershipWatch`).
SESSIONS_WITHOUT_MEMBER_ID = 4
#: How often the worker's loop asks its consumer for its member id (a lock and a string copy in librdkafka).
CHECK_EVERY_S = 1.0


class MembershipWatch:
    """Counts how long a consumer has gone without a member id; `stuck()` says when it is too long."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if limit_s <= 0:
            raise ValueError(f"limit_s must be positive, got {limit_s}")
        self.limit_s = limit_s
        self._clock = clock
        self._checked = clock()
        #: Since when the consumer has had no member id (None: it has one).
        self._without_since: float | None = self._checked

    @classmethod
    def for_session_timeout(cls, session_timeout_ms: int) -> MembershipWatch:
        return cls(SESSIONS_WITHOUT_MEMBER_ID * session_timeout_ms / 1000)

    def due(self) -> bool:
        """Whether it is time to look at the consumer's member id again (keeps the check off the hot path)."""
        return self._clock() - self._checked >= CHECK_EVERY_S

    def restart(self) -> None:
        """A new consumer (or a new subscription): it gets a full `limit_s` to join."""
        self._checked = self._clock()
        self._without_since = self._checked

    def stuck(self, member_id: str | None) -> float | None:
        """Record what the consumer said; the seconds it has been out of its group if that is over the limit."""
        now = self._checked = self._clock()
        if member_id:
            self._without_since = None
            return None
        if self._without_since is None:
            self._without_since = now
        out_for = now - self._without_since
        return out_for if out_for >= self.limit_s else None


def subscription_matches(subscription: Iterable[str], topics: Iterable[str]) -> bool:
    """Whether a subscription names at least one of `topics` (as librdkafka reads it: an entry starting with `^`
    is a regular expression, any other a topic's name)."""
    names = set(topics)
    for entry in subscription:
        if entry.startswith("^"):
            pattern = re.compile(entry)
            if any(pattern.match(name) for name in names):
                return True
        elif entry in names:
            return True
    return False
