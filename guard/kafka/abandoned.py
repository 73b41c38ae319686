"""Clients the worker gave up on: set aside, not destroyed on the worker's thread, and not kept forever.

The worker replaces a producer that is stuck or failed (and a consumer that can't close in time) without
destroying it: librdkafka's destroy waits for the client's threads, and a client stuck on an unanswering
broker can hold it for a long time. Kept forever, though, they pile up: while the cluster is unreachable the
worker rebuilds its clients every 30-75 s (`SanitizerWorker._rebuild_clients`), and each producer given up on
kept its librdkafka threads (four on the local stack) and broker connections for the rest of the worker's life.

`SetAside` keeps the last `keep` clients set aside (the ones whose calls may still be running on a helper
thread) and releases older ones on a daemon thread of their own, where a destroy that blocks blocks nobody.
A client still in use by a stuck call on another thread is destroyed when that call returns (the call holds
a reference); nothing here closes or flushes anything: a producer was purged before it was set aside.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

#: How many abandoned clients stay set aside before the oldest is released.
KEEP = 4


class SetAside:
    """The clients a worker abandoned, at most `keep` of them held; older ones destroyed in the background."""

    def __init__(self, keep: int = KEEP) -> None:
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}")
        self.keep = keep
        self._held: deque[Any] = deque()
        #: Clients handed to a releasing thread (they are gone once that thread is done).
        self.released = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, client: Any) -> None:
        self._held.append(client)
        while len(self._held) > self.keep:
            # The box holds the only reference (no argument or local of this thread does), and the thread takes
            # it out: the last reference, and with it librdkafka's destroy, is dropped there, never here.
            box = [self._held.popleft()]
            threading.Thread(target=_drop, args=(box,), name="bg-release", daemon=True).start()
            self.released += 1


def _drop(box: list[Any]) -> None:
    """Drop the client: its last reference goes here, so its destroy runs (and may block) on this thread."""
    box.pop()
