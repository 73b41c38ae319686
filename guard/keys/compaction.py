"""Rewrites of the key store's append-only file after shreds, on a background thread, a window at a time.

A shred deletes a subject's key from Redis's memory at once, but the append-only file (AOF) keeps the
commands that wrote the key until Redis rewrites the file. So every shred asks for a rewrite, and the
confirmation states how long the key may stay on that disk (docs/keys.md, "How long a deleted key can linger").

Why a window: a rewrite forks Redis and writes its whole dataset again (seconds, a core and the disk, for
millions of keys). Started after every shred, a stream that erases customers every second kept one running back
to back, and Redis's latency, the broker's CPU and the guard's throughput paid for it (`guard bench`,
docs/benchmark.md round 16). The rewrite starts at most `delay_s` after the first shred it covers; the shreds of
that window share it. The bound on a destroyed key's life on disk becomes the delay plus one rewrite, plus a
rewrite still running when the window ends (`compact` waits for it) or a key-store outage; `guard erase` still
compacts at once, and a worker that stops cleanly does not leave its window to the next one (`finish`).

The key store's compaction-due counter survives a crash, so a worker that starts with it above zero compacts
too (`start`).
"""

from __future__ import annotations

import logging
import threading
import time

from guard.errors import ConfigError, KeyUnavailableError
from guard.keys.store import RedisKeyStore

log = logging.getLogger("guard.keys.manager")

#: The longest `delay_s` allowed: a destroyed key must not stay on the key store's disk for long.
MAX_COMPACTION_DELAY_S = 3600.0


class Compactor:
    """The append-only-file rewrites one key manager's shreds asked for; the thread starts on the first request."""

    def __init__(self, store: RedisKeyStore, delay_s: float) -> None:
        if not 0 <= delay_s <= MAX_COMPACTION_DELAY_S:
            raise ConfigError(f"aof_compaction_delay_s must be between 0 and {MAX_COMPACTION_DELAY_S:.0f} seconds "
                              f"(it bounds how long a destroyed key stays in the key store's append-only file); "
                              f"got {delay_s}")
        self.store = store
        #: How long shreds gather before a rewrite starts.
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wanted = threading.Event()
        #: Set to cut the window short (`finish`).
        self._now = threading.Event()
        #: When the first shred not yet covered by a started rewrite asked for one (monotonic; None: none).
        self._asked: float | None = None
        #: When the last shred asked for a rewrite, and the start of the latest completed rewrite (monotonic):
        #: every shred is on disk no more once the second is at or after the first.
        self._last_asked: float | None = None
        self._covered = float("-inf")
        #: Rewrites this compactor completed (tests and `KeyManager.counters` read it).
        self.completed = 0

    def request(self) -> None:
        """A shred happened: have the file rewritten after it, within the window."""
        with self._lock:
            now = time.monotonic()
            self._last_asked = now
            if self._asked is None:
                self._asked = now
            self._wanted.set()
            self._ensure_thread()

    @property
    def pending(self) -> bool:
        """Whether a shred asked for a rewrite that no completed rewrite covers yet."""
        with self._lock:
            return self._last_asked is not None and self._covered < self._last_asked

    def finish(self, timeout_s: float = 120.0) -> bool:
        """Rewrite now if a shred is still waiting for its window (a worker's clean stop); True when every
        shred asked for is covered by a completed rewrite, False after `timeout_s`."""
        if not self.pending:
            return True
        with self._lock:
            self._now.set()
            self._ensure_thread()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.pending:
                return True
            time.sleep(0.05)
        return False

    def start(self) -> None:
        """At start-up: finish the compaction a crashed predecessor may have left due."""
        try:
            if self.store.compaction_due():
                self.request()
        except KeyUnavailableError as exc:
            log.warning("could not check whether an append-only-file rewrite is due (%s)", exc)

    def _ensure_thread(self) -> None:
        """Start the thread unless it runs (call with the lock held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="bg-aof-compaction", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        backoff = 1.0
        while self._wanted.wait(timeout=600):
            with self._lock:
                asked = self._asked
            if asked is not None:
                # Let the shreds of the window gather: one rewrite covers every shred before it starts.
                self._now.wait(max(0.0, asked + self.delay_s - time.monotonic()))
            with self._lock:
                self._wanted.clear()
                self._now.clear()
                self._asked = None  # a shred from here on asks for the next rewrite
                started = time.monotonic()
            try:
                # Nothing due: every shred counted so far is covered by a rewrite that started after it (another
                # worker's: all of a group's workers see the counter and ask, one rewrite is enough).
                if self.store.compaction_due() > 0:
                    self.store.compact()
                    with self._lock:
                        self.completed += 1
                with self._lock:
                    self._covered = max(self._covered, started)
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001 - keep retrying whatever Redis answers; never lose the request
                log.warning("append-only-file rewrite after a shred not done yet (%s); retrying in %.0f s",
                            type(exc).__name__ if not isinstance(exc, KeyUnavailableError) else exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                with self._lock:
                    # Retried after the backoff, not after another window: its shreds' window is over (a shred
                    # that came meanwhile is covered by the retry too).
                    self._asked = time.monotonic() - self.delay_s
                    self._wanted.set()
