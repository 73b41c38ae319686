"""A transaction's subject activity written to the key store while the transaction runs (write-ahead).

Activity says on which sanitized topics a data subject's ciphertexts may be (`RedisKeyStore.
record_subject_activity`); an erasure's confirmation lists those topics. It must be in the key store before
the transaction that produced the ciphertexts commits, or a crash right after the commit would leave a
committed ciphertext unlisted. Written in one call at the commit, it was the commit's longest step: about
10 ms of Redis time per 1,500 new (subject, topic) pairs, 9.8% of a steady worker's wall time
(docs/benchmark.md, round 16). Here the pairs are written in chunks from a helper thread as the batch is
processed, and the commit writes only the rest and waits for the chunks (`flush`).

Writing a pair before its record is produced, or for a transaction that then aborts, over-states where a
subject's data is: an erasure looks at a topic more, which is safe. A pair is noted as recorded
(`Sanitizer.mark_recorded`) only once its write succeeded and its transaction is about to commit, so an
aborted transaction's replay writes it again. The key store skips subjects erased meanwhile.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guard.keys.store import RedisKeyStore
    from guard.pipeline.sanitizer import Sanitizer

#: New pairs that make a chunk worth a write of its own while the batch runs.
ACTIVITY_CHUNK = 500


class ActivityWriter:
    """Writes the open transaction's new activity pairs ahead, in chunks, on one helper thread."""

    def __init__(self, store: RedisKeyStore, branch: str, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._store = store
        self._branch = branch
        self._pool = pool
        self._written: set[tuple[str, str]] = set()
        self._futures: list[concurrent.futures.Future[None]] = []
        self._seen = 0  # size of the sanitizer's activity at the last chunk

    def maybe_write(self, sanitizer: Sanitizer) -> None:
        """After a run of records: start a write of the new pairs if there are `ACTIVITY_CHUNK` of them."""
        if len(sanitizer.subject_activity) - self._seen < ACTIVITY_CHUNK:
            return
        self._seen = len(sanitizer.subject_activity)
        chunk = self._new_pairs(sanitizer)
        if chunk:
            self._written.update(chunk)
            self._futures.append(self._pool.submit(self._store.record_subject_activity, self._branch, chunk))

    def flush(self, sanitizer: Sanitizer) -> None:
        """At the commit: write the pairs not written yet, wait for every write of the transaction, and
        note them all as recorded. Raises what a write raised (`KeyUnavailableError`): the commit aborts."""
        rest = self._new_pairs(sanitizer)
        futures, self._futures = self._futures, []
        if rest:
            self._store.record_subject_activity(self._branch, rest)
        for future in futures:
            future.result()
        sanitizer.mark_recorded(self._written | set(rest))
        self.reset()

    def reset(self) -> None:
        """The transaction ended (committed, or aborted: its writes may finish, nothing is noted)."""
        self._written = set()
        self._futures = []
        self._seen = 0

    def _new_pairs(self, sanitizer: Sanitizer) -> dict[tuple[str, str], int | None]:
        written = self._written
        return {pair: when for pair, when in sanitizer.pending_activity().items() if pair not in written}
