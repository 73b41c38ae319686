"""A batch's activity written to the key store while the batch is still being sealed (issue 17).

Where a subject's ciphertexts went ((subject, sanitized topic) pairs, `Sanitizer.subject_activity`) must be
in the key store before the transaction that carries them commits: an erasure reads it to name the topics
in its deletion confirmation. It used to be written in one script call at the commit, and the worker
waited for it: ~6% of a first-sight worker's time (a transaction's ~1,500 new pairs), ~2% of a steady
one's (docs/benchmark.md, round 22). Native runs now stop every `SEND_EVERY_RECORDS` records and the pairs
they added are sent then (`Sanitizer.send_activity`), their replies read at the commit, so the key store
writes them while the worker seals the rest of the batch; the commit sends only what came after, then
waits for every write of the batch (`Sanitizer.activity_written`) before it goes on.

A pair written for a transaction that then aborts says a subject's ciphertexts went to a topic where
none of them committed yet: the replay commits them, and the confirmation's list of topics errs on the
side of naming one too many, as a commit that failed after the write always could. A pair never written
is the error that matters: the commit sends every pair added after the last send (every pair, after a pop
of an erased subject's pair moved the entries) and commits nothing until all of them are written.
"""

from __future__ import annotations

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
