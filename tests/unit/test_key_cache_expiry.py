"""Expired data keys leave the worker's memory (`KeyManager._purge`, docs/keys.md), not only its answers."""

from __future__ import annotations

import gc
import time

import pytest

from guard.keys.kms import LocalKeyring
from guard.keys.manager import KeyManager
from guard.keys.primitives import Aead, random_key
from guard.protect.fastpath import native_available
from tests.unit.test_index_keys import _TenantKeys


def _manager(ttl: float = 10.0, size: int = 200_000) -> KeyManager:
    return KeyManager(LocalKeyring(random_key()), _TenantKeys(), "bank-a", listen=False,  # type: ignore[arg-type]
                      cache_ttl=ttl, cache_size=size)


def test_caching_a_key_drops_the_expired_ones_before_it() -> None:
    keys = _manager()
    aead = Aead(random_key(), version=1)
    for n in range(5):
        keys._cache("0101", f"old-{n}", aead, 1_000.0)  # expire at 1,007.5-1,010
    keys._cache("0101", "fresh", aead, 1_005.0)  # none of the old ones has expired yet
    assert len(keys._deks) == 6
    keys._cache("0101", "later", aead, 1_010.1)  # every old one has
    assert list(keys._deks) == [("0101", "fresh"), ("0101", "later")]


def test_a_later_expiry_at_the_front_holds_back_the_purge_for_at_most_a_quarter_ttl() -> None:
    keys = _manager()
    aead = Aead(random_key(), version=1)
    keys._cache("0101", "front", aead, 1_000.0)
    keys._deks[("0101", "front")] = (aead, 1_010.0)  # the latest a key cached at 1,000 can expire
    keys._cache("0101", "behind", aead, 1_000.1)
    keys._deks[("0101", "behind")] = (aead, 1_007.6)  # the earliest
    keys._cache("0101", "x", aead, 1_008.0)  # "behind" expired but waits behind "front"
    assert ("0101", "behind") in keys._deks
    keys._cache("0101", "y", aead, 1_010.0)  # front expired: both go
    assert list(keys._deks) == [("0101", "x"), ("0101", "y")]


def test_purge_expired_runs_on_the_clock_and_never_drops_a_live_key() -> None:
    keys = _manager(ttl=10.0)
    aead = Aead(random_key(), version=1)
    now = time.monotonic()
    for n in range(3):
        keys._cache("0101", f"gone-{n}", aead, now - 100)
    keys._cache("0101", "live", aead, now)  # caching it drops the expired ones before it
    assert list(keys._deks) == [("0101", "live")]
    assert keys.cached_subject_aead("0101", "live").cache_entry() is aead.cache_entry()
    assert keys.purge_expired() == 0
    keys._deks[("0101", "live")] = (aead.cache_entry(), now - 1)  # its time is up
    assert keys.purge_expired() == 1 and not keys._deks
    assert keys.cached_subject_aead("0101", "live") is None


@pytest.mark.skipif(not native_available(), reason="NATIVE=0: built without the compiled hot path")
def test_cached_keys_are_nothing_the_garbage_collector_walks() -> None:
    """With the extension a cached key is its `SealingKey` next to a float (`Aead.cache_entry`): nothing the
    cyclic collector tracks once it has seen them, so a full collection doesn't walk a hundred thousand
    cached keys (40-120-ms pauses inside a batch before; docs/benchmark.md, round 19). What comes back out is
    the same key."""
    keys = _manager()
    made = [Aead(random_key(), version=1 + n % 3) for n in range(50)]
    keys._cache_all("0101", [(f"s{n}", aead) for n, aead in enumerate(made)], time.monotonic())
    gc.collect()
    assert not any(gc.is_tracked(entry) or gc.is_tracked(entry[0]) for entry in keys._deks.values())
    for n, aead in enumerate(made):
        back = keys.cached_subject_aead("0101", f"s{n}")
        assert back is not None and back.version == aead.version
        assert aead.open(back.seal(b"plaintext", b"ad"), b"ad") == b"plaintext"
