"""Shreds gather for `aof_compaction_delay_s` before one append-only-file rewrite covers them all
(`KeyManager.request_compaction`, docs/keys.md "How long a deleted key can linger")."""

from __future__ import annotations

import threading
import time

import pytest

from guard.config import Settings
from guard.errors import ConfigError, KeyUnavailableError
from guard.keys.compaction import MAX_COMPACTION_DELAY_S
from guard.keys.kms import LocalKeyring
from guard.keys.manager import KeyManager
from guard.keys.primitives import random_key
from guard.records.builders import _remains
from tests.unit.test_index_keys import _TenantKeys


class _CompactingStore(_TenantKeys):
    """Tenant keys, and `compact` calls recorded with their start times; the first `failures` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.started: list[float] = []
        self.failures = failures
        self.due = 1  # shreds not covered by a completed rewrite (the key store's counter)
        self.called = threading.Condition()

    def compaction_due(self) -> int:
        return self.due

    def compact(self) -> bool:
        with self.called:
            self.started.append(time.monotonic())
            self.called.notify_all()
        if len(self.started) <= self.failures:
            raise KeyUnavailableError("key store unreachable (ConnectionError) while compacting")
        return True

    def wait_for(self, calls: int, timeout: float = 30.0) -> list[float]:
        with self.called:
            assert self.called.wait_for(lambda: len(self.started) >= calls, timeout=timeout), self.started
            return list(self.started)


def _wait_compactions(keys: KeyManager, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while keys.compactions < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert keys.compactions == n


def _manager(store: _CompactingStore, delay: float) -> KeyManager:
    return KeyManager(LocalKeyring(random_key()), store, "bank-a", listen=False,  # type: ignore[arg-type]
                      compaction_delay_s=delay)


def test_the_shreds_of_a_window_share_one_rewrite_started_after_the_delay() -> None:
    store = _CompactingStore()
    keys = _manager(store, delay=0.5)
    first = time.monotonic()
    keys.request_compaction()
    time.sleep(0.1)
    keys.request_compaction()  # within the window: the same rewrite covers it
    started = store.wait_for(1)
    assert started[0] - first >= 0.5, "the rewrite started before the shreds of its window could gather"
    _wait_compactions(keys, 1)
    time.sleep(0.7)  # longer than the window: no second rewrite was asked for
    assert len(store.started) == 1

    again = time.monotonic()
    keys.request_compaction()  # a shred after the rewrite started asks for the next one, a window later
    started = store.wait_for(2)
    assert started[1] - again >= 0.5 and len(started) == 2


def test_without_a_delay_the_rewrite_starts_at_once() -> None:
    store = _CompactingStore()
    keys = _manager(store, delay=0.0)
    asked = time.monotonic()
    keys.request_compaction()
    started = store.wait_for(1)
    assert started[0] - asked < 5.0  # no window to wait out (the bound is for a loaded CI machine)


def test_a_failed_rewrite_is_retried_after_its_backoff_without_waiting_another_window() -> None:
    store = _CompactingStore(failures=1)
    keys = _manager(store, delay=60.0)
    keys.compactor._asked = time.monotonic() - 60.0  # the window of the first shred is over
    keys.request_compaction()
    store.wait_for(1)
    keys.request_compaction()  # a shred during the failed rewrite's backoff: the retry covers it, at once
    started = store.wait_for(2)
    assert started[1] - started[0] < 30.0, "the retry waited for a new window (60 s) instead of its backoff (1 s)"
    _wait_compactions(keys, 1)


@pytest.mark.parametrize("delay", [-1.0, MAX_COMPACTION_DELAY_S + 1])
def test_a_delay_outside_its_bounds_is_refused_with_what_it_bounds(delay: float) -> None:
    with pytest.raises(ConfigError, match="aof_compaction_delay_s must be between 0 and 3600 seconds"):
        _manager(_CompactingStore(), delay=delay)


def test_the_confirmation_states_the_delay_as_the_bound_on_the_append_only_file() -> None:
    entries = _remains(Settings(aof_compaction_delay_s=45.0), ["sanitized.br0101.public.customers"], 1)
    aof = next(e for e in entries if e["where"] == "key store append-only file")
    assert aof["until"] == (
        "the append-only-file rewrite the shred schedules completes (the worker starts it 45 s after the shred "
        "at most, later only while a rewrite already running has to finish first or the key store fails; if "
        "the worker crashed first, another worker does it, at its start or next maintenance plus that delay)")


def test_a_clean_stop_rewrites_at_once_instead_of_leaving_the_window_to_the_next_worker() -> None:
    store = _CompactingStore()
    keys = _manager(store, delay=3600.0)
    assert keys.finish_compaction(timeout_s=1) is True and store.started == []  # nothing asked: nothing to do
    keys.request_compaction()
    time.sleep(0.1)
    assert store.started == []  # the window runs
    assert keys.finish_compaction(timeout_s=30) is True
    assert len(store.started) == 1 and keys.compactions == 1
    assert keys.finish_compaction(timeout_s=1) is True and len(store.started) == 1  # covered: no second one


def test_a_stop_while_the_key_store_fails_says_the_rewrite_is_not_done() -> None:
    store = _CompactingStore(failures=100)
    keys = _manager(store, delay=3600.0)
    keys.request_compaction()
    assert keys.finish_compaction(timeout_s=0.5) is False
    assert keys.compactions == 0


def test_nothing_is_rewritten_when_another_workers_rewrite_covered_every_shred() -> None:
    store = _CompactingStore()
    store.due = 0  # another worker of the group compacted after the shreds this one saw counted
    keys = _manager(store, delay=0.2)
    keys.request_compaction()
    assert keys.finish_compaction(timeout_s=30) is True
    assert store.started == [] and keys.compactions == 0
