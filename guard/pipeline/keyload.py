"""A batch's data keys loaded in chunks on the native path, the next chunk's request in flight while the
run seals the records of the one before it (issue 17).

Why: a batch's keys used to come in one round trip, made when a native run first missed a key, and the
worker waited for it: for a first sight (every key new: the key store creates and writes hundreds of keys)
about 9% of the worker's time, for a steady stream whose keys expired from the cache about 5%
(docs/benchmark.md, round 22). The key store runs on another core and the worker has sealing to do, so
the wait can overlap the work instead.

How: the batch's distinct subjects come in the order of the record that first names each
(`FastPath.batch_subjects`, which also reads every record's envelope once for the runs). They are cut into
chunks at record positions: the first `FIRST_CHUNK_RECORDS` records from the miss, then each chunk
`CHUNK_GROWTH` times the one before (128, 512, 2,048 records: a batch of 2,000 records is three round trips
instead of one). The first chunk's keys are waited for (a small request), the second chunk's request is
sent before that wait, and each later chunk's request is sent when the run first misses a key of the chunk
before it, so one request is in flight while the run works through the records whose keys have come.

A subject's first record lies in its chunk's range, and a run goes through the records in order, so the
run's first miss at or past a chunk's first record is where that chunk's keys are needed: `reach` reads its
reply then (every earlier one first). A miss before the chunk in flight is a key that was cached when the
batch was read and expired or was invalidated since; the caller loads that record's key alone, as before.
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
    """The chunks of one batch's key load: which are loaded, which one is in flight, which wait."""

    def __init__(self, keys: KeyManager, branch: str) -> None:
        self._keys = keys
        self._branch = branch
        self._waiting: deque[tuple[int, list[str]]] = deque()
        #: (index of its first record, request) of the chunk whose request is in flight
        self._in_flight: tuple[int, KeyFetch] | None = None

    @property
    def pending(self) -> bool:
        """Whether chunks of the batch are still to be loaded."""
        return self._in_flight is not None or bool(self._waiting)

    def start(self, chunks: list[tuple[int, list[str]]]) -> None:
        """Load the first chunk's keys (waited for) with the second chunk's request sent ahead of it."""
        self.drop()
        self._waiting.extend(chunks)
        if not self._waiting:
            return
        _, subjects = self._waiting.popleft()
        first = self._keys.send_prefetch(self._branch, subjects)
        self._send_next()
        if first is not None:
            self._keys.finish_prefetch(first)

    def reach(self, index: int | None) -> bool:
        """A run missed a key at record `index` (None: the Python path, anywhere): read the replies of the
        chunks that start at or before it, sending the next chunk's request before each wait. Returns
        whether any chunk was loaded (False: the miss lies before the chunk in flight)."""
        loaded = False
        while self._in_flight is not None:
            start, fetch = self._in_flight
            if index is not None and index < start:
                break
            self._in_flight = None
            self._send_next()
            self._keys.finish_prefetch(fetch)
            loaded = True
        return loaded

    def settle(self) -> None:
        """The batch is done: the reply of a request still in flight is read and its keys cached (the key
        store did the work, and created keys are counted where they were created), or dropped if it can't
        be read; chunks not sent are forgotten. A request is left in flight when the run never reached its
        chunk: a partition held at a delete (its records come again in a later batch), a batch given up."""
        self._waiting.clear()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        try:
            self._keys.finish_prefetch(in_flight[1])
        except Exception:  # noqa: BLE001 - the batch is over either way; its keys load again when needed
            self._keys.drop_prefetch(in_flight[1])

    def drop(self) -> None:
        """Forget the batch's chunks: the request in flight is dropped unread, nothing of it cached."""
        self._waiting.clear()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._keys.drop_prefetch(in_flight[1])

    def _send_next(self) -> None:
        """Send the request of the next chunk that has keys to load (none if every key is cached)."""
        while self._waiting and self._in_flight is None:
            start, subjects = self._waiting.popleft()
            fetch = self._keys.send_prefetch(self._branch, subjects)
            if fetch is not None:
                self._in_flight = (start, fetch)
