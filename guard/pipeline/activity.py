"""A batch's activity written to the key store while the batch is still being sealed (issue 17).

Where a subject's ciphertexts went ((subject, sanitized topic) pairs, `Sanitizer.subject_activity`) must be
in the key store before the transaction that carries them commits: an erasure reads it to name the topics
in its deletion confirmation. It used to be written in one script call at the commit, and the worker
waited for it: ~6% of a first-sight worker's time (a transaction's ~1,500 new pairs), ~2% of a steady
one's (docs/benchmark.md, round 22). Native runs now stop every `SEND_EVERY_RECORDS` records and the pairs
they added are sent then (`Sanitizer.send_activity`), their replies read at the commit, so the key store
writes them while the worker seals the rest of the batch; the commit sends what came after as its first
step, so the key store writes it during the commit's other work, and waits for every write of the batch
(`Sanitizer.activity_written`) just before it sends the offsets and commits (`SanitizerWorker._commit`).

A pair written for a transaction that then aborts says a subject's ciphertexts went to a topic where
none of them committed yet: the replay commits them, and the confirmation's list of topics errs on the
side of naming one too many, as a commit that failed after the write always could. A pair never written
is the error that matters: the commit sends every pair added after the last send (every pair, after a pop
of an erased subject's pair moved the entries) and commits nothing until all of them are written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from guard.keys.store import PendingReply, RedisKeyStore

#: Records a native run seals between two early writes of the batch's activity.
SEND_EVERY_RECORDS = 500

Pair = tuple[str, str]


class EarlyActivity:
    """The activity writes of the open batch that were sent before its commit."""

    def __init__(self, store: RedisKeyStore, branch: str) -> None:
        self._store = store
        self._branch = branch
        self._in_flight: list[tuple[PendingReply, list[Pair]]] = []
        #: every pair sent for the open batch (in flight or written)
        self.sent: set[Pair] = set()

    def send(self, pairs: list[Pair]) -> None:
        """Send these pairs' write now (no expiry change); its reply is read by `written`."""
        if pairs:
            self._in_flight.append((self._store.send_subject_activity(self._branch, dict.fromkeys(pairs)), pairs))
            self.sent.update(pairs)

    def written(self) -> list[Pair]:
        """Read every reply (raises `KeyUnavailableError` if a write failed: the commit must not go on);
        returns the pairs the key store now has."""
        done: list[Pair] = []
        while self._in_flight:
            reply, pairs = self._in_flight[0]
            reply.result()
            self._in_flight.pop(0)
            done += pairs
        return done

    def drop(self) -> None:
        """Forget the batch's writes (it committed, or was given up: replies still unread are dropped)."""
        for reply, _ in self._in_flight:
            reply.drop()
        self._in_flight.clear()
        self.sent.clear()


class RecentPairs:
    """The pairs a worker wrote to the key store lately: a pair seen again is written again no sooner than
    half of `refresh_s` and no later than `refresh_s` after its last write
    (`guard.pipeline.sanitizer.ACTIVITY_REFRESH_S`).

    Two generations of half that span, each a set: a pair written goes into the current one; a pair in
    either counts as recorded; every half span the current one becomes the previous one and the previous
    one is forgotten. A pair written at `t` is therefore recorded until some time between `t + refresh_s/2`
    and `t + refresh_s`, never longer. Why sets and not a time per pair: the filter of a batch's pairs
    (thousands at first sight) is then two set differences in C, where a Python loop that read and
    compared each pair's time was ~4% of a first-sight worker's main thread (docs/benchmark.md, round 23).
    """

    #: Pairs kept per generation at most (a worker's memory bound); past it the generation is forgotten,
    #: which costs only writes (those pairs are written again).
    MAX_PAIRS = 250_000

    def __init__(self, clock: Callable[[], float], refresh_s: float) -> None:
        self._clock = clock
        self._half = refresh_s / 2
        self._current: set[Pair] = set()
        self._previous: set[Pair] = set()
        self._turn = clock() + self._half

    def unrecorded(self, pairs: Iterable[Pair]) -> set[Pair]:
        """Those of `pairs` not written within the span."""
        self._age()
        out = set(pairs)
        out -= self._current
        out -= self._previous
        return out

    def add(self, pairs: Iterable[Pair]) -> None:
        """Note pairs the key store now has (after the write succeeded)."""
        self._age()
        if len(self._current) > self.MAX_PAIRS:
            self._current.clear()
        self._current.update(pairs)

    def discard(self, pair: Pair) -> None:
        """Forget a pair (an erased subject's: it must be written again if the subject comes back)."""
        self._current.discard(pair)
        self._previous.discard(pair)

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def _age(self) -> None:
        now = self._clock()
        if now < self._turn:
            return
        if now < self._turn + self._half:  # on schedule: a pair's generation ends a span after it began
            self._previous, self._turn = self._current, self._turn + self._half
        else:  # idle for a span or more: both generations are over
            self._previous, self._turn = set(), now + self._half
        self._current = set()
