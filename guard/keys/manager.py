"""The key hierarchy: master key (KMS) → branch key → data-subject key, plus tenant keys.

- A **data-subject key** (DEK) encrypts one customer's protected fields. Destroying it (crypto-shredding)
  makes every copy of those fields unreadable: in every topic, replica, backup and downstream system.
- A **branch key** (KEK) wraps the DEKs of the customers of one branch. A branch transfer re-wraps DEKs
  under the new owner's branch key without touching the data.
- **Tenant keys** (per organisation): the index root key, from which one blind-index key per (field,
  purpose) is derived with HKDF (`index_for`; tokens of one field join across the tenant's branches), the
  keyed hash for C3 data, and the quarantine of DLQ records. Only the sanitizer derives index keys: a
  manager built with `indexes=False` (an image-only reader) never loads the root.
- The **master key** stays in the KMS and only wraps branch and tenant keys.

Hot-path cost: DEKs are cached unwrapped in this process for at most `cache_ttl` seconds (default 60),
and dropped at once when another worker shreds or rotates them (Redis pub/sub). That TTL is the bound on
how long a shredded key can linger in a running worker that missed the notification.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guard.errors import (
    KeyShreddedError,
    KeyUnavailableError,
    SubjectRestrictedError,
    TenantKeyMissingError,
)
from guard.keys.compaction import Compactor
from guard.keys.kms import Kms
from guard.keys.primitives import Aead, BlindIndex, Hmac, KeyedHash, KeyWrapper, random_key, sealed_header
from guard.keys.store import PendingReply, RedisKeyStore, StaleBranchKeyError

log = logging.getLogger(__name__)

#: Share of the TTL before its expiry in which a batch's prefetch fetches a cached key again (`prefetch`).
REFRESH_MARGIN = 0.25
#: The version of a subject's first data key: the one `get_or_create_deks` keeps when the subject has none.
FIRST_KEY_VERSION = 1
#: How long a commit-time check waits for the listener to apply a shred the key store has counted.
CATCH_UP_S = 0.2
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ShredResult:
    branch: str
    subject: str
    versions_destroyed: int
    already_erased: bool
    #: `done` (the key destroyed, or none existed: `versions_destroyed` says which), `already` (erased
    #: before; nothing written), `held` (under legal hold; nothing destroyed).
    status: str = "done"


class _Spoiled:
    """The subjects whose freshly fetched keys must not be cached (`KeyManager._invalidated_since`)."""

    __slots__ = ("everything", "subjects")

    def __init__(self, subjects: set[str] | None) -> None:
        self.everything = subjects is None
        self.subjects = subjects or set()

    def __contains__(self, subject: object) -> bool:
        return self.everything or subject in self.subjects


_NOTHING = _Spoiled(set())
_EVERYTHING = _Spoiled(None)


@dataclass(frozen=True, slots=True)
class TxnMark:
    """Where a worker's view of erasures stood when a transaction began (`KeyManager.mark`)."""

    invalidations: int


#: New data keys as `KeyWrapper.mint_aeads` returns them: (wrapped, key) per subject.
_Minted = list[tuple[bytes, Aead]]


@dataclass(slots=True)
class KeyFetch:
    """A prefetch sent to the key store and not read yet (`KeyManager.send_prefetch`)."""

    branch: str
    #: the subjects asked for, in the order asked
    missing: list[str]
    #: when the request was sent (monotonic): cached keys' TTL counts from here
    started: float
    #: the invalidation count before it was sent: invalidations after it spoil what it brings
    seen: int
    #: an offer's new keys (wrapped, key) and what was offered (subject, wrapped); None for a plain read
    minted: _Minted | None
    offered: list[tuple[str, bytes]] | None
    reply: PendingReply


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
        indexes: bool = True,
        tenant_check_s: float = 5.0,
        compaction_delay_s: float = 60.0,
    ) -> None:
        self._kms = kms
        self.store = store
        self.tenant = tenant
        self._ttl = cache_ttl
        self._cache_size = cache_size
        #: (branch, subject) → (key as `Aead.cache_entry` keeps it, monotonic expiry): with the extension a
        #: `SealingKey`, which the garbage collector doesn't walk. Never rebound (filled, popped and cleared
        #: in place): the compiled path reads this very dict for each event's key (`native_key_cache`).
        self._deks: OrderedDict[tuple[str, str], tuple[object, float]] = OrderedDict()
        #: Subjects the key store answered "erased" for, at most `cache_size`. An erasure is final (the key
        #: store's erased marker blocks re-creation for good), so the answer can't go stale, and each later
        #: event of an erased customer costs no round trip (a branch's stream after a shred still carries
        #: the deletes and late updates of erased customers: 2% of the bench's steady drain).
        self._erased: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Older key versions opened by the reveal path, with the same TTL as current keys.
        self._old: dict[tuple[str, str, int], tuple[Aead, float]] = {}
        #: Invalidations this worker has applied (pub/sub messages and reconnects): a key fetch that saw
        #: this number change is not cached, and a transaction during which it changed is checked.
        self._invalidations = 0
        #: The highest erasure epoch whose invalidation this worker has applied.
        self._applied_epoch = 0
        #: The last invalidations applied, in order: (branch, subject), or None for "everything".
        self._invalidated: deque[tuple[str, str] | None] = deque(maxlen=100_000)
        self._keks: dict[tuple[str, int], KeyWrapper] = {}
        self._current_kek: dict[str, tuple[KeyWrapper, float]] = {}
        self._lock = threading.Lock()
        # The tenant's keys are read (or, for a tenant without data, minted) together: fail closed on a
        # missing one (TenantKeyMissingError).
        #: Whether this manager may derive blind-index keys (the sanitizer's, the reveal service's for search);
        #: an image-only reader may not: it
        #: never unwraps the index root (the store hands over all wrapped tenant keys, to fail closed).
        self.indexes = indexes
        tenant_keys = self._tenant_keys(self.TENANT_PURPOSES if indexes else ("hash", "quarantine"))
        self._index_root: bytes | None = tenant_keys.get("index")
        self._indexes: dict[tuple[str, str], BlindIndex] = {}
        self.keyed_hash = KeyedHash(tenant_keys["hash"])
        self.quarantine = Aead(tenant_keys["quarantine"], version=1)
        del tenant_keys
        self._dlq_hash: Hmac | None = None
        self._tenant_check_s = tenant_check_s
        self._tenant_checked = time.monotonic()
        self._listener: threading.Thread | None = None
        #: Append-only-file rewrites after this manager's shreds (`guard.keys.compaction`).
        self.compactor = Compactor(store, compaction_delay_s)
        #: Counters for the benchmark (`counters`): integer adds on the hot path, nothing more.
        self.key_lookups = 0
        self.key_hits = 0
        self.keys_fetched = 0
        self.keys_created = 0
        #: Whether a prefetch offers every uncached subject a new key in its one round trip (right when most
        #: are new: a first sight), or reads the keys first and offers keys only to the subjects without one
        #: (right when most exist: no key minted and wrapped in vain). Each prefetch sets it for the next.
        self._offer_first = True
        if listen:
            self._start_listener()

    def __repr__(self) -> str:
        return f"KeyManager(tenant={self.tenant!r})"

    # --- tenant and branch keys -------------------------------------------------------------------
    TENANT_PURPOSES = ("index", "hash", "quarantine")

    def _tenant_keys(self, unwrap: tuple[str, ...]) -> dict[str, bytes]:
        """The tenant's keys of the purposes `unwrap`; all of them are minted together, and only for a tenant
        without key-store data, else read (TenantKeyMissingError when one of them is gone)."""
        names = {p: f"tenant/{self.tenant}/{p}" for p in self.TENANT_PURPOSES}
        wrapped = self.store.tenant_keys({p: self._kms.wrap(random_key(), n) for p, n in names.items()})
        try:
            return {p: self._kms.unwrap(wrapped[p], names[p]) for p in unwrap}
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

    def drop_branch_keys(self, branch: str) -> None:
        """Forget this process's branch keys of `branch` (a transfer installed a new one, retired old ones)."""
        with self._lock:
            self._current_kek.pop(branch, None)
            for key in [k for k in self._keks if k[0] == branch]:
                del self._keks[key]

    # --- a branch transfer: the incoming owner's branch key, re-wrapping, retiring (guard/transfer) ------
    def prepare_transfer_key(self, branch: str, transfer_id: str) -> bytes:
        """A new branch key for the incoming owner, wrapped by the master key under a name of its own
        (`kek/<branch>/transfer/<id>`): kept by the transfer until the cut-over installs it."""
        return self._kms.wrap(random_key(), f"kek/{branch}/transfer/{transfer_id}")

    def install_transfer_key(self, branch: str, transfer_id: str, prepared: bytes) -> int:
        """Install the prepared key as the branch's current version and floor (once per transfer; a rerun
        returns the version installed before), then tell every worker to drop its cached branch keys.

        From here on no data key can be wrapped under an older version (the key store refuses it), so one
        pass of `rewrap_subject` over the branch's subjects leaves none under a retiring version.
        """
        key = self._kms.unwrap(prepared, f"kek/{branch}/transfer/{transfer_id}")
        try:
            for _ in range(10):
                current, _ = self.store.kek_versions(branch)
                version = self.store.install_handover_kek(branch, transfer_id, current,
                                                          self._kms.wrap(key, f"kek/{branch}/v{current + 1}"))
                if version == -2:
                    raise KeyUnavailableError(f"another transfer of branch {branch} is re-keying it "
                                              f"({self.store.kek_handover(branch)[1]}); finish that one first")
                if version > 0:
                    break
            else:
                raise KeyUnavailableError(f"the branch key of branch {branch} kept changing during the handover")
        finally:
            del key
        self.drop_branch_keys(branch)
        self.store.publish_branch_invalidation(branch)
        return version

    def rewrap_subject(self, branch: str, subject: str) -> tuple[int, str]:
        """Re-wrap every version of the subject's data key that is wrapped under a branch-key version below
        the floor, under the floor version (the incoming owner's key). The data key itself is unchanged, so
        every record sealed under it still opens. Returns (versions re-wrapped, `rewrapped` | `current` |
        `erased` | `no_key`); a compare-and-set, so a concurrent rotation or shred is never overwritten."""
        floor, _ = self.store.kek_handover(branch)
        name = f"dek/{branch}/{subject}"
        for _ in range(10):
            fields = self.store.dek_fields(branch, subject)
            if not fields:
                return 0, "erased" if self.is_erased(branch, subject) else "no_key"
            changes = []
            for field, wrapped in sorted(fields.items()):
                _, kek_version = sealed_header(wrapped)
                if kek_version < floor:
                    dek = self._kek(branch, kek_version).unwrap(wrapped, name)
                    changes.append((field, wrapped, self._kek(branch, floor).wrap(dek, name)))
                    del dek
            if not changes:
                return 0, "current"
            done = self.store.rewrap_dek(branch, subject, changes)
            if done == -1:
                return 0, "erased"
            if done > 0:
                self.forget(branch, subject)
                return done, "rewrapped"
        raise KeyUnavailableError(f"the key of subject {subject} kept changing while it was being re-wrapped")

    def retire_transfer_keys(self, branch: str) -> int:
        """Delete the branch-key versions below the floor (none may still wrap a data key: the caller checks)
        and tell every worker to drop its cached branch keys; returns how many versions were deleted."""
        retired = self.store.retire_kek_below_floor(branch)
        self.drop_branch_keys(branch)
        self.store.publish_branch_invalidation(branch)
        return retired

    def kek_version_of(self, wrapped: bytes) -> int:
        """The branch-key version a wrapped data key names in its header."""
        return sealed_header(wrapped)[1]

    # --- blind-index keys (the sanitizer's only) ---------------------------------------------------
    def index_for(self, field: str, purpose: str) -> BlindIndex:
        """The blind index of one field for one purpose: its key is HKDF-SHA256 of the tenant's index root
        key with info `bg/index/v1 | tenant | field | purpose` (each u32-length-prefixed).

        One key per (tenant, field, purpose): a token of one field (a mobile) says nothing about another
        (an ID number, a subject), and a key, were one ever exposed, opens one field only. Raises for a
        manager built with `indexes=False` (an image-only reader never holds an index key).
        """
        index = self._indexes.get((field, purpose))
        if index is not None:
            return index
        index = BlindIndex(self._derive_index_key(field, purpose))
        if len(self._indexes) > 10_000:  # fields are column names: bounded in practice
            self._indexes.clear()
        self._indexes[(field, purpose)] = index
        return index

    def _derive_index_key(self, field: str, purpose: str) -> bytes:
        if self._index_root is None:
            raise KeyUnavailableError(
                "blind-index keys stay inside the sanitizer: this key manager was built without them "
                "(indexes=False, an image-only reader); search goes through the reveal service")
        info = b"bg/index/v1" + b"".join(_U32.pack(len(p)) + p for p in (
            self.tenant.encode(), field.encode(), purpose.encode()))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._index_root)

    @property
    def dlq_hash(self) -> Hmac:
        """Fingerprints of DLQ inputs (HMAC-SHA256: `value_hmac`, `key_hmac`, and the DLQ record's Kafka key):
        comparable by the guard, not confirmable by a guesser. Its key is derived like the index keys
        (field `dlq`, purpose `fingerprint`), so it stays inside the sanitizer too.
        """
        if self._dlq_hash is None:
            self._dlq_hash = Hmac(self._derive_index_key("dlq", "fingerprint"))
        return self._dlq_hash

    def search_token(self, column: str, value: bytes) -> str:
        """The blind index of a column's value in sanitized images (purpose `search`, one key per column)."""
        index = self._indexes.get((column, "search"))
        return (index or self.index_for(column, "search")).token(value)

    def key_token(self, column: str, value: bytes) -> str:
        """The token of a Kafka key column's value (purpose `row_key`, one key per column)."""
        index = self._indexes.get((column, "row_key"))
        return (index or self.index_for(column, "row_key")).token(value)

    # --- data-subject keys ------------------------------------------------------------------------
    def subject_token(self, branch: str, subject_id: object) -> str:
        """The pseudonymous, keyed token that names a data subject everywhere outside the branch DB.

        Customer ids are per-branch surrogates (customer 17 of branch 0101 and customer 17 of branch 0202
        are different people), so the token is of (branch, id), length-prefixed; the tenant is the key's.
        It is stable for a person within a branch (every table's `customer_id` gives the same token).
        """
        branch_b, id_b = branch.encode(), str(subject_id).encode()
        return self.index_for("subject", "subject_token").token(
            b"subject\x00" + _U32.pack(len(branch_b)) + branch_b + _U32.pack(len(id_b)) + id_b)

    def row_subject_token(self, branch: str, table: str, row_key: bytes) -> str:
        """The token of a row that names no data subject: the row is its own subject (per-row key).

        Of (branch, table, the row's sanitized Kafka key), length-prefixed, in a domain of its own, so it
        never equals a person's token.
        """
        parts = [branch.encode(), table.encode(), row_key]
        return self.index_for("subject", "subject_token").token(
            b"row\x00" + b"".join(_U32.pack(len(p)) + p for p in parts))

    def subject_aead(self, branch: str, subject: str) -> Aead:
        """The subject's current data key, created on first use; raises if the subject was erased.

        Creating it is what sealing needs; readers use `subject_aead_for`, which never creates a key.
        """
        now = time.monotonic()
        cache_key = (branch, subject)
        hit = self._deks.get(cache_key)
        self.key_lookups += 1
        if hit is not None and hit[1] > now:
            self.key_hits += 1
            return Aead.of_cache_entry(hit[0])
        if cache_key in self._erased:
            self.key_hits += 1
            raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased; its key is destroyed")
        kek = self._kek(branch)
        name = f"dek/{branch}/{subject}"
        seen = self._invalidations
        (offered, mine), = kek.mint_aeads([name], FIRST_KEY_VERSION)
        try:
            found = self.store.get_or_create_dek(branch, subject, offered)
        except StaleBranchKeyError:  # a transfer retired the cached branch key: read it again, wrap again
            self.drop_branch_keys(branch)
            kek = self._kek(branch)
            seen = self._invalidations
            (offered, mine), = kek.mint_aeads([name], FIRST_KEY_VERSION)
            found = self.store.get_or_create_dek(branch, subject, offered)
        self.keys_fetched += 1
        if found is None:
            self._remember_erased(branch, [subject])
            raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased; its key is destroyed")
        version, wrapped = found
        if wrapped == offered and version == FIRST_KEY_VERSION:  # the store kept the key minted here
            self.keys_created += 1
            aead = mine
        else:
            aead = self._unwrap_dek(branch, wrapped, name, version)
        self._remember(branch, subject, aead, now, seen)
        return aead

    def cached_subject_aead(self, branch: str, subject: str) -> Aead | None:
        """The subject's data key if this worker holds it unexpired, else None (no key-store round trip)."""
        hit = self._deks.get((branch, subject))
        self.key_lookups += 1
        if hit is not None and hit[1] > time.monotonic():
            self.key_hits += 1
            return Aead.of_cache_entry(hit[0])
        return None

    def native_key_cache(self) -> OrderedDict[tuple[str, str], tuple[object, float]]:
        """The data-key cache itself, for the compiled path's per-event lookup (`guard_native.FastPath`'s
        `key_cache`: `cached_subject_aead`'s rule, without a Python call per event): (branch, subject) →
        (`SealingKey`, monotonic expiry). Read-only there; it reports its lookups through `count_lookups`."""
        return self._deks

    def count_lookups(self, lookups: int, hits: int) -> None:
        """Add lookups of the cache made elsewhere (the compiled path's) to `key_lookups`/`key_hits`."""
        self.key_lookups += lookups
        self.key_hits += hits

    def prefetch(self, branch: str, subjects: set[str]) -> None:
        """Load (or create) every uncached key of `subjects` in one key-store round trip, two at most.

        Called once per batch, so a burst of new or long-idle customers costs one round trip instead of
        one per event. Erased subjects are skipped; `subject_aead` reports them when they are used.
        While most of a prefetch's keys are new (a first sight), each subject is offered a new key and the
        key store keeps the ones it has (one round trip); while most exist (a steady stream whose keys
        expired from the cache), the keys are read first and only the subjects without one are offered
        keys (a second round trip, only if there are any): minting and wrapping a key for every known
        customer cost a worker ~2% of its time for keys the store then threw away (docs/benchmark.md).

        Keys that expire within `REFRESH_MARGIN` of their TTL are fetched again with the batch: a key that
        expired while the batch was being processed would otherwise cost a round trip of its own (with a
        10-s TTL and batches of a second, a hundred per batch: `guard bench`, docs/benchmark.md round 10).
        The refreshed key comes from the key store, so the TTL still bounds how long a shredded key lingers.
        """
        fetch = self.send_prefetch(branch, subjects)
        if fetch is not None:
            self.finish_prefetch(fetch)

    def send_prefetch(self, branch: str, subjects: Iterable[str]) -> KeyFetch | None:
        """`prefetch`'s request, sent now; `finish_prefetch` reads its reply and caches the keys.

        In between the caller does other work (a native run seals the records of the chunk before), while
        the key store answers. None if every key is cached already. Several may be in flight (a batch's
        chunks); each chooses between offering new keys and reading first from the last reply read before it.
        Every request must end in `finish_prefetch` or `drop_prefetch` (it holds a connection until then).
        """
        self.check_tenant_keys()
        now = time.monotonic()
        horizon = now + self._ttl * REFRESH_MARGIN
        # each subject once: a key-creation call offered one subject two keys would keep the second
        missing = [s for s in dict.fromkeys(subjects)
                   if ((hit := self._deks.get((branch, s))) is None or hit[1] <= horizon)
                   and (branch, s) not in self._erased]
        if not missing:
            return None
        self._kek(branch)  # loaded (once per branch key) before `seen`: its round trip is no fetch of keys
        seen = self._invalidations  # invalidations from here on spoil what the store returns
        if self._offer_first:
            minted, offered = self._mint_offers(branch, missing)
            return KeyFetch(branch, missing, now, seen, minted, offered,
                            self.store.send_get_or_create_deks(branch, offered))
        # Most keys existed last time: read them first, minting and wrapping keys for none of them; only the
        # subjects without one are offered new keys, in a second round trip (`finish_prefetch`).
        return KeyFetch(branch, missing, now, seen, None, None, self.store.send_get_deks(branch, missing))

    def finish_prefetch(self, fetch: KeyFetch) -> None:
        """Read the reply of `send_prefetch`'s request and cache the keys it brought (raises what `prefetch`
        raises: `KeyUnavailableError` when the key store can't be reached)."""
        branch, missing = fetch.branch, fetch.missing
        if fetch.minted is not None and fetch.offered is not None:
            created, loaded, erased = self._take_offers(branch, missing, fetch.minted, fetch.offered, fetch.reply)
            # Most keys existed (a steady stream of known customers): read them first next time.
            self._offer_first = created * 2 > len(missing)
        else:
            stored, erased, new = fetch.reply.result()
            loaded = self._unwrap_stored(branch, [(s, *stored[s]) for s in missing if s in stored])
            if new:
                _, made, gone = self._offer_keys(branch, new)
                loaded += made
                erased += gone
            # Most were new (a snapshot, a new branch): offer keys at once next time, one round trip.
            self._offer_first = len(new) * 2 > len(missing)
        self.keys_fetched += len(missing)
        self._remember_many(branch, loaded, fetch.started, fetch.seen)
        self._remember_erased(branch, erased)

    @staticmethod
    def drop_prefetch(fetch: KeyFetch) -> None:
        """Forget a request whose keys nobody will use (a batch given up): nothing of its reply is cached."""
        fetch.reply.drop()

    def _offer_keys(self, branch: str, subjects: list[str]) -> tuple[int, list[tuple[str, Aead]], list[str]]:
        """Load or create the keys of `subjects` in one round trip: a new key is minted and wrapped for each,
        and the key store keeps it where the subject has none (`get_or_create_deks`). Returns (keys created,
        (subject, key) loaded, erased subjects)."""
        minted, offered = self._mint_offers(branch, subjects)
        return self._take_offers(branch, subjects, minted, offered,
                                 self.store.send_get_or_create_deks(branch, offered))

    def _mint_offers(self, branch: str, subjects: list[str]) -> tuple[_Minted, list[tuple[str, bytes]]]:
        """A new key for each subject, wrapped under the branch key: (minted (wrapped, key), offered
        (subject, wrapped))."""
        names = [f"dek/{branch}/{s}" for s in subjects]  # each key's name in its wrapping, built once
        # A key the store keeps is its subject's first version (`scripts.CREATE_DEKS`); minted inside the extension
        # where there is one, so a new key's bytes never become a Python object (`KeyWrapper.mint_aeads`).
        minted = self._kek(branch).mint_aeads(names, FIRST_KEY_VERSION)
        return minted, [(s, wrapped) for s, (wrapped, _) in zip(subjects, minted, strict=True)]

    def _take_offers(self, branch: str, subjects: list[str], minted: _Minted, offered: list[tuple[str, bytes]],
                     reply: PendingReply) -> tuple[int, list[tuple[str, Aead]], list[str]]:
        """What the key store did with offered keys: (keys created, (subject, key) loaded, erased subjects)."""
        try:
            found = reply.result()
        except StaleBranchKeyError:  # a transfer retired the cached branch key: read it again, wrap again
            self.drop_branch_keys(branch)
            minted, offered = self._mint_offers(branch, subjects)
            found = self.store.get_or_create_deks(branch, offered)
        created = 0
        loaded: list[tuple[str, Aead]] = []
        erased: list[str] = []
        stored: list[tuple[str, int, bytes]] = []
        for (subject, mine), (_, key), result in zip(offered, minted, found, strict=True):
            if result is None:
                erased.append(subject)
                continue
            version, wrapped = result
            if wrapped != mine or version != FIRST_KEY_VERSION:
                stored.append((subject, version, wrapped))
            else:  # the store kept the key this call minted: it is `key`, no need to unwrap it
                created += 1
                loaded.append((subject, key))
        self.keys_created += created
        return created, loaded + self._unwrap_stored(branch, stored), erased

    def _unwrap_stored(self, branch: str, stored: list[tuple[str, int, bytes]]) -> list[tuple[str, Aead]]:
        """Keys another worker (or an earlier run) created: (subject, version, wrapped key) → (subject, key),
        each group wrapped by one branch-key version unwrapped in one call (`KeyWrapper.unwrap_aeads`)."""
        groups: dict[int, tuple[list[str], list[tuple[bytes, str, int]]]] = {}
        for subject, version, wrapped in stored:
            group = groups.setdefault(sealed_header(wrapped)[1], ([], []))
            group[0].append(subject)
            group[1].append((wrapped, f"dek/{branch}/{subject}", version))
        loaded: list[tuple[str, Aead]] = []
        for kek_version, (subjects_of, items) in groups.items():
            loaded += zip(subjects_of, self._kek(branch, kek_version).unwrap_aeads(items), strict=True)
        return loaded

    def _remember_erased(self, branch: str, subjects: list[str]) -> None:
        with self._lock:
            for subject in subjects:
                self._erased[(branch, subject)] = None
                self._erased.move_to_end((branch, subject))
            while len(self._erased) > self._cache_size:
                self._erased.popitem(last=False)

    def _remember(self, branch: str, subject: str, aead: Aead, now: float, seen: int) -> None:
        with self._lock:
            if subject in self._invalidated_since(seen, branch):
                return
            self._cache(branch, subject, aead, now)

    def _remember_many(self, branch: str, keys: list[tuple[str, Aead]], now: float, seen: int) -> None:
        """`_cache` for a batch's keys: the size bound and the expired front are enforced once, at the end."""
        with self._lock:
            spoiled = self._invalidated_since(seen, branch)
            self._cache_all(branch, [(subject, aead) for subject, aead in keys if subject not in spoiled], now)

    def _invalidated_since(self, seen: int, branch: str) -> _Spoiled:
        """Subjects of `branch` that invalidations applied since `seen` name (call with the lock held).

        An invalidation that arrives while keys are fetched may name one of them, and the listener has
        already forgotten it: caching that key now would keep a destroyed key for a TTL. Only the named
        subjects are refused; a dropped cache (reconnect, unreadable message) or more invalidations than
        remembered refuse every key. (Refusing every key on any invalidation made each shred during a
        batch's prefetch cost the rest of the batch a key-store round trip per record.)
        """
        since = self._invalidations - seen
        if since == 0:
            return _NOTHING
        if since > len(self._invalidated):
            return _EVERYTHING
        named: set[str] = set()
        for entry in list(self._invalidated)[-since:]:
            if entry is None:
                return _EVERYTHING
            if entry[0] == branch:
                named.add(entry[1])
        return _Spoiled(named)

    def _cache(self, branch: str, subject: str, aead: Aead, now: float) -> None:
        self._cache_all(branch, [(subject, aead)], now)

    def _cache_all(self, branch: str, keys: list[tuple[str, Aead]], now: float) -> None:
        """Cache keys (call with the lock held); the size bound and the expired front are enforced once.

        Jitter spreads expiries, so keys fetched together (a snapshot, a burst) don't all expire in the
        same second and stall the stream with a wave of key-store round trips.
        """
        deks, ttl, jitter = self._deks, self._ttl, random.random
        for subject, aead in keys:
            deks[(branch, subject)] = (aead.cache_entry(), now + ttl * (0.75 + 0.25 * jitter()))
            deks.move_to_end((branch, subject))
        while len(deks) > self._cache_size:
            deks.popitem(last=False)
        self._purge(now)

    def _purge(self, now: float) -> int:
        """Drop expired keys from the front of the cache (call with the lock held); returns how many.

        The cache is in the order keys were (re)cached, so its front holds the earliest expiries (within the
        jitter, a quarter of the TTL). An expired key can no longer be used, but kept it would stay in memory
        until 200,000 newer keys pushed it out: with customers seen once in a while that is every key seen,
        a worker's memory grew for minutes before it levelled off (`guard bench --soak`), and an erased
        customer's unwrapped key outlived the TTL in memory. Popping the expired front at each insert and
        each batch (`purge_expired`) keeps about one TTL's keys, at O(1) per key.
        """
        deks, dropped = self._deks, 0
        while deks:
            first = next(iter(deks.values()))
            if first[1] > now:
                break
            deks.popitem(last=False)
            dropped += 1
        return dropped

    def purge_expired(self) -> int:
        """Forget every expired key at the front of the cache (once per batch: `Sanitizer.prefetch`)."""
        with self._lock:
            return self._purge(time.monotonic())

    def counters(self) -> dict[str, int]:
        """What this manager's data-key cache and key store did so far (the benchmark reports them).

        `key_lookups`/`key_hits`: per-event lookups of a subject's current key and those the cache answered
        (on the native path a miss is looked up again once the batch's keys are loaded); `keys_fetched`:
        subjects whose key came from the key store, `keys_created` of them minted by this worker;
        `store_round_trips`: requests to the key store (a pipeline counts once), from every thread;
        `data_key_round_trips`: those of them that loaded or created data keys (a batch's prefetch is one);
        `invalidations`: shreds and rotations applied from the invalidation channel; `compactions`:
        append-only-file rewrites this manager's compactor completed (`request_compaction`).
        """
        return {"key_lookups": self.key_lookups, "key_hits": self.key_hits, "keys_fetched": self.keys_fetched,
                "keys_created": self.keys_created, "store_round_trips": self.store.round_trips,
                "data_key_round_trips": self.store.data_key_round_trips,
                "invalidations": self._invalidations, "cached_keys": len(self._deks),
                "compactions": self.compactions}

    def subject_aead_for(self, branch: str, subject: str, sealed: bytes) -> Aead:
        """The key version that sealed `sealed`, for reading (the reveal path). Never creates a key.

        Refuses a subject under legal hold or storage-only (`SubjectRestrictedError`): its data is kept,
        not revealed (docs/keys.md, "Legal hold"). Opened versions are cached for `cache_ttl`, like
        current keys, and dropped on an invalidation.
        """
        _, version = sealed_header(sealed)
        if self.store.is_restricted(branch, subject):
            raise SubjectRestrictedError(
                f"data subject {subject} of branch {branch} is under legal hold or storage-only: its data is "
                "kept sealed and cannot be revealed until the hold is released")
        now = time.monotonic()
        cached = self._old.get((branch, subject, version))
        if cached is not None and cached[1] > now:
            return cached[0]
        seen = self._invalidations
        wrapped = self.store.dek_version(branch, subject, version)
        if wrapped is None:
            if self.store.erased_record(branch, subject) is not None:
                raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased")
            raise KeyUnavailableError(f"key version {version} of subject {subject} is not in the key store")
        aead = self._unwrap_dek(branch, wrapped, f"dek/{branch}/{subject}", version)
        with self._lock:
            if self._invalidations == seen:
                if len(self._old) > 10_000:
                    self._old.clear()
                self._old[(branch, subject, version)] = (aead, now + self._ttl)
        return aead

    def _unwrap_dek(self, branch: str, wrapped: bytes, name: str, version: int) -> Aead:
        """One stored data key as an `Aead` of `version`, unwrapped under the branch-key version that wrapped
        it (inside the extension when there is one: `KeyWrapper.unwrap_aeads`)."""
        return self._kek(branch, sealed_header(wrapped)[1]).unwrap_aeads([(wrapped, name, version)])[0]

    def rotate_subject_key(self, branch: str, subject: str) -> int:
        try:
            version = self.store.rotate_dek(branch, subject,
                                            self._kek(branch).mint_wrapped(f"dek/{branch}/{subject}"))
        except StaleBranchKeyError:
            self.drop_branch_keys(branch)
            version = self.store.rotate_dek(branch, subject,
                                            self._kek(branch).mint_wrapped(f"dek/{branch}/{subject}"))
        if version is None:
            raise KeyShreddedError(f"data subject {subject} of branch {branch} was erased")
        self.forget(branch, subject)
        return version

    def shred(self, branch: str, subject: str, record: bytes,
              pending: Callable[[int, bool], bytes | None] | None = None, *,
              preview: tuple[int, bool] | None = None,
              held: Callable[[], tuple[bytes, bytes]] | None = None) -> ShredResult:
        """Destroy all versions of the subject's key, everywhere, and block its re-creation.

        `pending(versions, already_erased)` builds the confirmation entry that the key store writes in
        the same script as the shred (`RedisKeyStore.shred`), so a crash can't separate the two. Once
        the script has run, nothing here raises: the invalidation went out with it, and the append-only
        file rewrite is requested in the background (`request_compaction`), its failures retried there.
        `preview`: `(versions, already erased)` as the caller just read them (`RedisKeyStore.erasure_view`),
        used for the first attempt instead of reading them again; a race is caught by the shred all the same.
        `held()`: (the deferred erasure, the held confirmation's pending entry), written by the same script if
        the subject turns out to be under legal hold (`RedisKeyStore.shred`).
        """
        for _ in range(10):
            versions, already = preview if preview is not None else self.store.shred_preview(branch, subject)
            preview = None
            entry = pending(versions, already) if pending is not None and not (already and versions == 0) else None
            done = self.store.shred(branch, subject, record, expected_versions=versions, pending=entry,
                                    held=None if held is None else held())
            if done.status != "changed":
                break
        else:
            raise KeyUnavailableError(f"the key of subject {subject} kept changing while it was being shredded")
        if done.status == "done":
            self.forget(branch, subject)
            if done.versions_destroyed:
                self.request_compaction()
        return ShredResult(branch, subject, done.versions_destroyed, done.already_erased, done.status)

    def request_compaction(self) -> None:
        """Have the append-only file rewritten after the shreds so far, within the window (`guard.keys.compaction`)."""
        self.compactor.request()

    @property
    def compaction_pending(self) -> bool:
        """Whether a shred this manager made is not yet covered by a completed append-only-file rewrite."""
        return self.compactor.pending

    def finish_compaction(self, timeout_s: float = 120.0) -> bool:
        """Rewrite now if a shred is still waiting for its window (a worker's clean stop); True when every
        shred this manager asked a rewrite for is covered by a completed one, False after `timeout_s`."""
        return self.compactor.finish(timeout_s)

    def start_compactor(self) -> None:
        """At start-up: finish the compaction a crashed predecessor may have left due."""
        self.compactor.start()

    @property
    def compactions(self) -> int:
        """Append-only-file rewrites this manager's compactor completed."""
        return self.compactor.completed

    def is_erased(self, branch: str, subject: str) -> bool:
        return self.store.erased_record(branch, subject) is not None

    def forget(self, branch: str, subject: str) -> None:
        with self._lock:
            self._deks.pop((branch, subject), None)
            for key in [k for k in self._old if k[0] == branch and k[1] == subject]:
                del self._old[key]

    # --- erasures racing with writes -------------------------------------------------------------------
    def mark(self) -> TxnMark:
        """Call when a transaction begins; `erased_since` then says which of its subjects were erased."""
        return TxnMark(self._invalidations)

    def erased_since(self, mark: TxnMark, branch: str, subjects: set[str], epoch: int | None = None) -> list[str]:
        """The subjects among `subjects` (whose keys sealed data since `mark`) that are erased by now.

        Call just before committing. A key used from the cache may have been destroyed if an
        invalidation arrived since the mark (the listener forgot the key after the use) or if the key
        store has counted a shred whose invalidation this worker has not applied yet. The check waits up
        to `CATCH_UP_S` for the listener to apply such a shred; then only the subjects the invalidations
        since the mark name are asked about (one pipelined round trip, usually none); if the listener is
        still behind, or dropped everything since (reconnect, unreadable message), every subject is.
        Otherwise the answer costs one GET of the erasure epoch (none when the caller read it already).
        """
        if not subjects:
            return []
        if epoch is None:
            epoch = self.store.erasure_epoch()
        if epoch > self._applied_epoch:
            # The shred's invalidation is published by the shred script itself: it is usually milliseconds
            # away. Waiting a little for it lets the check below stay local.
            deadline = time.monotonic() + CATCH_UP_S
            while epoch > self._applied_epoch and time.monotonic() < deadline:
                time.sleep(0.002)
            if epoch > self._applied_epoch:
                return self.store.erased_among(branch, sorted(subjects))
        with self._lock:
            since = self._invalidations - mark.invalidations
            if since == 0:
                return []
            named = list(self._invalidated)[-since:] if since <= len(self._invalidated) else None
        if named is None or any(entry is None for entry in named):
            return self.store.erased_among(branch, sorted(subjects))  # a reconnect or garbage dropped everything
        candidates = subjects & {subject for b, subject in named if b == branch}  # type: ignore[misc]
        return self.store.erased_among(branch, sorted(candidates)) if candidates else []

    # --- cross-worker invalidation ----------------------------------------------------------------
    def _on_invalidation(self, data: object) -> None:
        """Apply one invalidation message; anything malformed drops the whole cache (never raises)."""
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
            branch, subject, *rest = text.split(":")
            epoch = int(rest[0]) if rest else None
        except (UnicodeDecodeError, ValueError):
            log.warning("malformed message on the key invalidation channel; dropping every cached key")
            self._drop_all()
            return
        if not subject:  # "<branch>:": a transfer changed the branch's keys
            self.drop_branch_keys(branch)
            return
        with self._lock:
            self._invalidations += 1
            self._invalidated.append((branch, subject))
            self._deks.pop((branch, subject), None)
            for key in [k for k in self._old if k[0] == branch and k[1] == subject]:
                del self._old[key]
            if epoch is not None and epoch > self._applied_epoch:
                self._applied_epoch = epoch

    def _drop_all(self, epoch: int | None = None) -> None:
        with self._lock:
            self._invalidations += 1
            self._invalidated.append(None)
            self._deks.clear()
            self._old.clear()
            if epoch is not None and epoch > self._applied_epoch:
                self._applied_epoch = epoch

    def _start_listener(self) -> None:
        def run() -> None:
            while True:
                try:
                    pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.store.invalidate_channel)
                    # A reconnect may have missed messages: drop the whole cache to stay correct. Every
                    # shred up to the epoch read after subscribing is covered by that.
                    self._drop_all(self.store.erasure_epoch())
                    for message in pubsub.listen():
                        self._on_invalidation(message.get("data"))
                except (redis.RedisError, KeyUnavailableError):
                    time.sleep(1.0)
                except Exception:  # noqa: BLE001 - the listener must outlive anything it is sent
                    log.exception("key invalidation listener failed; resubscribing")
                    self._drop_all()
                    time.sleep(1.0)

        self._listener = threading.Thread(target=run, name="bg-key-invalidation", daemon=True)
        self._listener.start()
