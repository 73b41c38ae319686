"""The key hierarchy: master key (KMS) → branch key → data-subject key, plus tenant keys.

- A **data-subject key** (DEK) encrypts one customer's protected fields. Destroying it (crypto-shredding)
  makes every copy of those fields unreadable: in every topic, replica, backup and downstream system.
- A **branch key** (KEK) wraps the DEKs of the customers of one branch. A branch transfer re-wraps DEKs
  under the new owner's branch key without touching the data.
- **Tenant keys** (per organisation) key the blind indexes (so tokens join across that tenant's branches),
  the keyed hash for C3 data, and the quarantine of DLQ records.
- The **master key** stays in the KMS and only wraps branch and tenant keys.

Hot-path cost: DEKs are cached unwrapped in this process for at most `cache_ttl` seconds (default 60),
and dropped at once when another worker shreds or rotates them (Redis pub/sub). That TTL is the bound on
how long a shredded key can linger in a running worker that missed the notification.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis

from guard.errors import KeyShreddedError, KeyUnavailableError, TenantKeyMissingError
from guard.keys.kms import Kms
from guard.keys.primitives import Aead, BlindIndex, KeyedHash, KeyWrapper, random_key, sealed_header
from guard.keys.store import RedisKeyStore


@dataclass(frozen=True, slots=True)
class ShredResult:
    branch: str
    subject: str
    versions_destroyed: int
    already_erased: bool


class KeyManager:
    """Hands out primitives for a tenant's branches; never hands out key bytes."""

    def __init__(
        self,
        kms: Kms,
        store: RedisKeyStore,
        tenant: str,
        *,
        cache_ttl: float = 60.0,
        cache_size: int = 200_000,
        listen: bool = True,
        tenant_check_s: float = 5.0,
    ) -> None:
        self._kms = kms
        self.store = store
        self.tenant = tenant
        self._ttl = cache_ttl
        self._cache_size = cache_size
        self._deks: OrderedDict[tuple[str, str], tuple[Aead, float]] = OrderedDict()
        self._old: dict[tuple[str, str, int], Aead] = {}
        self._keks: dict[tuple[str, int], KeyWrapper] = {}
        self._current_kek: dict[str, tuple[KeyWrapper, float]] = {}
        self._lock = threading.Lock()
        tenant_keys = self._tenant_keys()
        self.index = BlindIndex(tenant_keys["index"])
        self.keyed_hash = KeyedHash(tenant_keys["hash"])
        self.quarantine = Aead(tenant_keys["quarantine"], version=1)
        self._tenant_check_s = tenant_check_s
        self._tenant_checked = time.monotonic()
        self._listener: threading.Thread | None = None
        if listen:
            self._start_listener()

    def __repr__(self) -> str:
        return f"KeyManager(tenant={self.tenant!r})"

    # --- tenant and branch keys -------------------------------------------------------------------
    TENANT_PURPOSES = ("index", "hash", "quarantine")

    def _tenant_keys(self) -> dict[str, bytes]:
        """The tenant's keys, minted only for a tenant without key-store data (else TenantKeyMissingError)."""
        names = {p: f"tenant/{self.tenant}/{p}" for p in self.TENANT_PURPOSES}
        wrapped = self.store.tenant_keys({p: self._kms.wrap(random_key(), n) for p, n in names.items()})
        try:
            return {p: self._kms.unwrap(wrapped[p], names[p]) for p in self.TENANT_PURPOSES}
        except Exception:
            raise KeyUnavailableError(
                "the master key cannot unwrap this tenant's keys: the key store was written under another "
                "master key (check GUARD_MASTER_KEY / GUARD_MASTER_KEY_FILE)"
            ) from None

    def check_tenant_keys(self, *, force: bool = False) -> None:
        """Raise `TenantKeyMissingError` if a tenant key vanished from the key store (at most every few s).

        A running worker keeps its tenant keys in memory, so it would go on deciding with keys that no
        other (restarted) worker can get any more; it calls this once per batch and stops instead.
        """
        now = time.monotonic()
        if not force and now - self._tenant_checked < self._tenant_check_s:
            return
        missing = self.store.missing_tenant_keys(list(self.TENANT_PURPOSES))
        self._tenant_checked = now
        if missing:
            raise TenantKeyMissingError(self.tenant, missing)

    def _kek(self, branch: str, version: int | None = None) -> KeyWrapper:
        if version is not None and (branch, version) in self._keks:
            return self._keks[(branch, version)]
        if version is None:
            cached = self._current_kek.get(branch)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
        current, wrapped = self.store.kek_versions(branch)
        if current == 0:
            self.store.create_kek_if_absent(branch, self._kms.wrap(random_key(), f"kek/{branch}/v1"))
            current, wrapped = self.store.kek_versions(branch)
        want = current if version is None else version
        if want not in wrapped:
            raise KeyUnavailableError(f"branch key version {want} of branch {branch} is not in the key store")
        kek = KeyWrapper(self._kms.unwrap(wrapped[want], f"kek/{branch}/v{want}"), version=want)
        self._keks[(branch, want)] = kek
        if version is None:
            # Other workers' rotations reach this one within a TTL; until then new data keys are still
            # wrapped under the previous branch-key version, which stays valid.
            self._current_kek[branch] = (kek, time.monotonic() + self._ttl)
        return kek

    def rotate_branch_key(self, branch: str) -> int:
        """Start a new branch-key version; new DEKs are wrapped under it, old ones still unwrap."""
        current, _ = self.store.kek_versions(branch)
        version = self.store.add_kek_version(branch, self._kms.wrap(random_key(), f"kek/{branch}/v{current + 1}"))
        self._keks.pop((branch, version), None)
        self._current_kek.pop(branch, None)
        return version

    # --- data-subject keys ------------------------------------------------------------------------
    def subject_token(self, subject_id: object) -> str:
        """The pseudonymous, keyed token that names a data subject everywhere outside the branch DB."""
        return self.index.token(b"subject\x00" + str(subject_id).encode())

    def subject_aead(self, branch: str, subject: str) -> Aead:
        """The subject's current data key, created on first use; raises if the subject was erased."""
        now = time.monotonic()
        cache_key = (branch, subject)
        hit = self._deks.get(cache_key)
        if hit is not None and hit[1] > now:
            return hit[0]
        kek = self._kek(branch)
        name = f"dek/{branch}/{subject}"
        found = self.store.get_or_create_dek(branch, subject, kek.wrap(random_key(), name))
        if found is None:
            raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased; its key is destroyed")
        version, wrapped = found
        aead = Aead(self._unwrap_dek(branch, wrapped, name), version=version)
        self._remember(branch, subject, aead, now)
        return aead

    def cached_subject_aead(self, branch: str, subject: str) -> Aead | None:
        """The subject's data key if this worker holds it unexpired, else None (no key-store round trip)."""
        hit = self._deks.get((branch, subject))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def prefetch(self, branch: str, subjects: set[str]) -> None:
        """Load (or create) every uncached key of `subjects` in one key-store round trip.

        Called once per batch, so a burst of new or long-idle customers costs one round trip instead of
        one per event. Erased subjects are skipped; `subject_aead` reports them when they are used.
        """
        self.check_tenant_keys()
        now = time.monotonic()
        missing = [s for s in subjects if (hit := self._deks.get((branch, s))) is None or hit[1] <= now]
        if not missing:
            return
        kek = self._kek(branch)
        found = self.store.get_or_create_deks(
            branch, [(s, kek.wrap(random_key(), f"dek/{branch}/{s}")) for s in missing])
        for subject, result in zip(missing, found, strict=True):
            if result is None:
                continue
            version, wrapped = result
            aead = Aead(self._unwrap_dek(branch, wrapped, f"dek/{branch}/{subject}"), version=version)
            self._remember(branch, subject, aead, now)

    def _remember(self, branch: str, subject: str, aead: Aead, now: float) -> None:
        with self._lock:
            # Jitter spreads expiries, so keys fetched together (a snapshot, a burst) don't all expire
            # in the same second and stall the stream with a wave of key-store round trips.
            self._deks[(branch, subject)] = (aead, now + self._ttl * (0.75 + 0.25 * random.random()))
            self._deks.move_to_end((branch, subject))
            while len(self._deks) > self._cache_size:
                self._deks.popitem(last=False)

    def subject_aead_for(self, branch: str, subject: str, sealed: bytes) -> Aead:
        """The key version that sealed `sealed` (for decryption of older records after a rotation)."""
        _, version = sealed_header(sealed)
        current = self.subject_aead(branch, subject) if self.store.erased_record(branch, subject) is None else None
        if current is not None and current.version == version:
            return current
        cached = self._old.get((branch, subject, version))
        if cached is not None:
            return cached
        wrapped = self.store.dek_version(branch, subject, version)
        if wrapped is None:
            if self.store.erased_record(branch, subject) is not None:
                raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased")
            raise KeyUnavailableError(f"key version {version} of subject {subject} is not in the key store")
        aead = Aead(self._unwrap_dek(branch, wrapped, f"dek/{branch}/{subject}"), version=version)
        self._old[(branch, subject, version)] = aead
        return aead

    def _unwrap_dek(self, branch: str, wrapped: bytes, name: str) -> bytes:
        _, kek_version = sealed_header(wrapped)
        return self._kek(branch, kek_version).unwrap(wrapped, name)

    def rotate_subject_key(self, branch: str, subject: str) -> int:
        kek = self._kek(branch)
        version = self.store.rotate_dek(branch, subject, kek.wrap(random_key(), f"dek/{branch}/{subject}"))
        if version is None:
            raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased")
        self.forget(branch, subject)
        return version

    def shred(self, branch: str, subject: str, record: bytes) -> ShredResult:
        """Destroy all versions of the subject's key, everywhere, and block its re-creation."""
        already = self.store.erased_record(branch, subject) is not None
        destroyed = self.store.shred(branch, subject, record)
        self.forget(branch, subject)
        self.store.compact()
        return ShredResult(branch, subject, destroyed, already)

    def is_erased(self, branch: str, subject: str) -> bool:
        return self.store.erased_record(branch, subject) is not None

    def forget(self, branch: str, subject: str) -> None:
        with self._lock:
            self._deks.pop((branch, subject), None)
            for key in [k for k in self._old if k[0] == branch and k[1] == subject]:
                del self._old[key]

    # --- cross-worker invalidation ----------------------------------------------------------------
    def _start_listener(self) -> None:
        def run() -> None:
            while True:
                try:
                    pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.store.invalidate_channel)
                    # A reconnect may have missed messages: drop the whole cache to stay correct.
                    with self._lock:
                        self._deks.clear()
                        self._old.clear()
                    for message in pubsub.listen():
                        branch, _, subject = message["data"].decode().partition(":")
                        self.forget(branch, subject)
                except redis.RedisError:
                    time.sleep(1.0)

        self._listener = threading.Thread(target=run, name="bg-key-invalidation", daemon=True)
        self._listener.start()
