"""A batch's data keys loaded in chunks on the native path, every chunk's request in flight from the batch's
first miss while the run seals the records of the chunks before it (issue 17).

Why: a batch's keys used to come in one round trip, made when a native run first missed a key, and the
worker waited for it: for a first sight (every key new: the key store creates and writes hundreds of keys)
about 9% of the worker's time, for a steady stream whose keys expired from the cache about 5%
(docs/benchmark.md, round 22). The key store runs on another core and the worker has sealing to do, so
the wait can overlap the work instead.

How: the batch's distinct subjects come in the order of the record that first names each
(`FastPath.batch_subjects`, which also reads every record's envelope once for the runs). They are cut into
chunks at record positions: the first `FIRST_CHUNK_RECORDS` records from the miss, then each chunk
`CHUNK_GROWTH` times the one before (128, 512, 2,048 records: a batch of 2,000 records is three round trips
instead of one). Every chunk's request is sent at the first miss, in order, and only the first chunk's reply
(a small request) is waited for there: the key store works through the others back to back while the run
seals the records of the chunks before them, and each chunk's reply is read when the run first reaches it.
(Until round 25 each request went when the run reached the chunk before; sending them all at once measured
no faster, and is kept as the simpler load: docs/benchmark.md, round 25.)

A subject's first record lies in its chunk's range, and a run goes through the records in order, so the
run's first miss at or past a chunk's first record is where that chunk's keys are needed: `reach` reads its
reply then (every earlier one first). A miss before the next chunk in flight is a key that was cached when
the batch was read and expired or was invalidated since; the caller loads that record's key alone, as before.
Each request in flight holds a connection of the key store's pool (`PendingReply`): a batch holds as many as
it has chunks (three or four).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from guard.keys.manager import KeyFetch, KeyManager

#: Records from the first miss whose keys are waited for before the run goes on.
FIRST_CHUNK_RECORDS = 128
#: How many times more records each chunk covers than the one before it.
CHUNK_GROWTH = 4


def plan_chunks(first: int, tokens: Sequence[str], at: Sequence[int],
                extra: Iterable[str] = ()) -> list[tuple[int, list[str]]]:
    """Cut a batch's subjects into chunks: (index of the chunk's first record, its subjects), in order.

    `tokens[n]` is first named by the record at index `at[n]` (ascending, all `>= first`); `extra` subjects
    (records the native path can't read, decoded in Python) join the first chunk. Each subject is in one
    chunk only, the one of its first record: `batch_subjects` reads each table's ids apart, so a customer
    whose account follows its own row comes twice (and one request must never offer a subject two keys).
    Chunks without a subject are left out.
    """
    chunks: list[tuple[int, list[str]]] = []
    start, size = first, FIRST_CHUNK_RECORDS
    current: list[str] = list(dict.fromkeys(extra))
    placed = set(current)
    for token, position in zip(tokens, at, strict=True):
        while position >= start + size:
            if current:
                chunks.append((start, current))
                current = []
            start += size
            size *= CHUNK_GROWTH
        if token not in placed:
            placed.add(token)
            current.append(token)
    if current:
        chunks.append((start, current))
    return chunks


class ChunkedKeyLoad:
    """The chunks of one batch's key load: the requests in flight, in the order of their chunks."""

    def __init__(self, keys: KeyManager, branch: str) -> None:
        self._keys = keys
        self._branch = branch
        #: (index of its first record, request) of each chunk whose request is in flight, in record order
        self._in_flight: deque[tuple[int, KeyFetch]] = deque()

    @property
    def pending(self) -> bool:
        """Whether chunks of the batch are still to be loaded."""
        return bool(self._in_flight)

    def start(self, chunks: list[tuple[int, list[str]]]) -> None:
        """Send every chunk's request, then load the first chunk's keys (waited for)."""
        self.drop()
        for start, subjects in chunks:
            fetch = self._keys.send_prefetch(self._branch, subjects)
            if fetch is not None:
                self._in_flight.append((start, fetch))
        if self._in_flight:
            _, first = self._in_flight.popleft()
            self._keys.finish_prefetch(first)

    def reach(self, index: int | None) -> bool:
        """A run missed a key at record `index` (None: the Python path, anywhere): read the replies of the
        chunks that start at or before it. Returns whether any chunk was loaded (False: the miss lies before
        the next chunk in flight)."""
        loaded = False
        while self._in_flight and (index is None or index >= self._in_flight[0][0]):
            _, fetch = self._in_flight.popleft()
            self._keys.finish_prefetch(fetch)
            loaded = True
        return loaded

    def settle(self) -> None:
        """The batch is done: the replies of requests still in flight are read and their keys cached (the key
        store did the work, and created keys are counted where they were created); once one can't be read,
        it and the rest are dropped. A request is left in flight when the run never reached its chunk: a
        partition held at a delete (its records come again in a later batch), a batch given up."""
        while self._in_flight:
            _, fetch = self._in_flight.popleft()
            try:
                self._keys.finish_prefetch(fetch)
            except Exception:  # noqa: BLE001 - the batch is over either way; its keys load again when needed
                self._keys.drop_prefetch(fetch)
                self.drop()

    def drop(self) -> None:
        """Forget the batch's chunks: the requests in flight are dropped unread, nothing of them cached."""
        while self._in_flight:
            _, fetch = self._in_flight.popleft()
            self._keys.drop_prefetch(fetch)
