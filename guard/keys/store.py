"""Durable, shared storage of wrapped keys in Redis.

Only wrapped (encrypted) keys are stored; unwrapping needs the KMS master key, which Redis never sees.
Every worker of a deployment talks to the same Redis, so they share keys: the first worker that needs a
data subject's key creates it atomically (a Lua script: `guard.keys.scripts`), the others read the winner's key.

Redis layout: every name starts with `bg:{tenant}:` (the tenant's prefix), so one Redis ACL user per
tenant can be limited to its own keys (`~bg:{tenant}:*`) and channel (`&bg:{tenant}:*`). Single-subject Lua
scripts name every key they touch in KEYS; the scripts that take a batch's or a transaction's subjects at
once build those keys' names inside from a prefix the client sends; Redis checks every command inside a
script against the user's key patterns either way, so the ACL applies to them too:

    bg:{t}:tenant                    hash  purpose → unix s: which tenant keys were ever minted (the registry)
    bg:{t}:branches                  set   branches that have a branch key (data exists for the tenant)
    bg:{t}:kek:{branch}              hash  current → n, v<n> → branch key wrapped by the master key; floor → the
                                           lowest version new data keys may be wrapped under, handover →
                                           "<transfer id> <version>" while a transfer retires the versions below
    bg:{t}:tkey:{purpose}            str   tenant key (blind index root, keyed hash, quarantine) wrapped by the
                                           master key
    bg:{t}:dek:{branch}:{subject}    hash  current → n, v<n> → data key wrapped by the branch key, created → unix s
    bg:{t}:erased:{branch}:{subject} str   JSON shred record; blocks re-creation of the subject's key
    bg:{t}:hold:{branch}             set   subject tokens under legal hold (storage-only instead of shred)
    bg:{t}:storage-only:{b}:{s}      str   the erasure a legal hold deferred (JSON; PIPL Art. 47 para. 2)
    bg:{t}:on-topic:{branch}:{topic} set   subjects with ciphertexts on the sanitized topic
    bg:{t}:activity-topics:{branch}  set   the sanitized topics that have an on-topic set
    bg:{t}:topics:{branch}:{subject} set   read only: the subject's topics as workers before f6fcade kept them
    bg:{t}:expiry:{branch}           zset  subject → unix time its retention runs out (relationship end + retention)
    bg:{t}:erasure-due:{branch}      zset  subject → when a scheduled erasure (root delete + grace) is carried out
    bg:{t}:erasure-due-info:{branch} hash  subject → the scheduled erasure (JSON: trigger, reason, source, …)
    bg:{t}:pending:{branch}          hash  subject → confirmation written with the shred, until a committed write
                                           carries it (JSON: id, owner, source, the records)
    bg:{t}:ckeys:{branch}:{subject}  set   (topic, partition, key) of the subject's records on compacted topics
    bg:{t}:ckey-owner:{branch}       hash  (topic, partition, key) → the subject whose record it is
    bg:{t}:erasure-epoch             str   counter: +1 per shred (workers check it before committing)
    bg:{t}:compact-shreds            str   counter: +1 per shred that destroyed a key (never lowered)
    bg:{t}:compact-covered           str   the compact-shreds count the latest completed AOF rewrite covers
    bg:{t}:compact-due               str   legacy: what was due as workers before compact-shreds counted it
                                           (still due; lowered by compactions, no longer incremented)
    bg:{t}:alerted:{key}             str   alert deduplication across workers (expires)
    bg:{t}:attrib:{branch}:{txid}    set   principals the transaction's guard.principal messages named (expires
                                           after ATTRIBUTION_TTL_S; docs/policy.md, "Attribution contract")
    bg:{t}:reveal:tokens             hash  keyed hash of a reveal token → `hmac-sha256:<MAC>:` + JSON (principal, id,
                                           created, expires; the MAC binds the entry to its field, docs/reveal.md)
    bg:{t}:reveal:rate:{principal}:{window}  str  records revealed or searched by a principal in one window (expires)
    bg:{t}:audit-ckpt:{audit topic}  hash  "{chain} {size}" → signed checkpoint note (the audit chain's second store)
    bg:{t}:invalidate                pub/sub channel: "{branch}:{subject}" after a rotation,
                                     "{branch}:{subject}:{epoch}" after a shred

Tenant keys fail closed: they are minted once, together, and only for a tenant without any key-store data
(no registry, no branch key). If the registry or a branch key exists but a tenant key is gone, minting a
new one would make every blind index, keyed hash and quarantined record of the tenant unmatched and let
erasures "succeed" on keys that were never used, so `tenant_keys` raises `TenantKeyMissingError` instead.

Durability: the stack runs Redis with `appendonly yes` and `appendfsync always`, so a key acknowledged
here is on disk before any record encrypted under it is committed to Kafka. Deleted keys can linger in
the append-only file until it is rewritten; `compact` makes sure a rewrite that started after the shred
completes (docs/keys.md).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from guard.errors import KeyUnavailableError, TenantKeyMissingError
from guard.keys import scripts
from guard.keys.redis_client import redis_client

#: How long a transaction's attribution is kept: far longer than a delete waits for it
#: (`attribution_wait_s`) and than a worker's replay after a crash reaches back.
ATTRIBUTION_TTL_S = 7 * 86_400

#: Incremented by every shred (in the same script): workers compare it before committing (docs/keys.md).
#: (Names below the tenant's prefix: `RedisKeyStore.epoch_key`, `compact_shreds_key`, `invalidate_channel`.)
EPOCH_KEY = "erasure-epoch"
#: Shreds that destroyed a key, counted in the shred's own script; only ever incremented.
COMPACT_SHREDS_KEY = "compact-shreds"
#: The `compact-shreds` count that the latest completed append-only-file rewrite covers; only ever raised.
#: What is due is the difference: two compactors that read the same count both raise this to it, where
#: a counter of what is due, lowered by each, went below zero and then hid the next shred.
COMPACT_COVERED_KEY = "compact-covered"
#: The counter of what is due that workers before the two keys above kept (incremented by their shreds,
#: lowered by their compactions): still counted as due, lowered by a compaction that read it, never below 0.
LEGACY_COMPACT_DUE_KEY = "compact-due"
INVALIDATE_CHANNEL = "invalidate"

def tenant_prefix(tenant: str) -> str:
    """`bg:{tenant}:`: every key and channel of the tenant starts with it (its Redis ACL pattern)."""
    if not tenant or any(c in tenant for c in ":*?[]{} "):
        raise ValueError(f"tenant {tenant!r} must be non-empty without ':', spaces or glob characters")
    return f"bg:{tenant}:"




@dataclass(frozen=True, slots=True)
class ShredOutcome:
    """What the shred script did: `done`, `already` (erased before, no key left), `held`, `changed`."""

    status: str
    versions_destroyed: int
    already_erased: bool
    epoch: int


@dataclass(frozen=True, slots=True)
class ErasureView:
    """What an erasure reads before its shred (`RedisKeyStore.erasure_view`): the sanitized topics the
    subject's records went to, its key versions and erased marker (`shred_preview`), and its latest
    records on compacted topics, `(topic, partition, key)`."""

    topics: frozenset[str]
    versions: int
    already_erased: bool
    compacted: list[tuple[str, int, bytes]]


class StaleBranchKeyError(KeyUnavailableError):
    """A data key was wrapped under a branch-key version that a transfer retires: re-read the branch key."""

    def __init__(self, branch: str) -> None:
        super().__init__(f"the branch key of branch {branch} changed (a transfer retires the version used); "
                         "wrap under the current version")
        self.branch = branch


def _same(reply: Any) -> Any:
    return reply


def _unavailable(exc: redis.RedisError) -> KeyUnavailableError:
    """The key store's failure as the worker reports it: fail closed, and say what to check."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return KeyUnavailableError(
            f"the key store refused a command to this Redis user ({exc}); check the user's ACL (the local "
            "stack's: guard/stack/redisd.py)")
    return KeyUnavailableError(
        f"key store unreachable ({type(exc).__name__}); check GUARD_REDIS_URL, "
        "GUARD_REDIS_PASSWORD_FILE and that Redis runs")


class PendingReply:
    """A call already sent to the key store (a script, or a command), whose reply is read when it is needed
    (`result`).

    Why: a batch's data keys are loaded in chunks (`KeyManager.send_prefetch`). Every chunk's request is
    sent at the batch's first miss and each reply read when the run reaches its chunk, so the key store's
    work (the script, its append-only-file write, the wire) overlaps the worker's instead of stalling it:
    waiting on key creation was 9% of a first-sight worker's time and key loading's round trip about 5% of
    a steady one's (docs/benchmark.md, round 22).

    The same serves the copy of committed audit checkpoints to the second store, which nothing waits on
    (`send_audit_checkpoints`; the runner reads its reply at the next copy).

    The request holds a connection of its own from the client's pool until its reply is read (or the call
    is dropped), so nothing else is ever sent on it in between. A request that could not be sent, a
    connection lost before the reply, or a script the server no longer has (a restart) is made again the
    ordinary way at `result` (the client's retries, the script loaded again); what still fails raises
    `KeyUnavailableError`, as every other call does. `result` returns what the same synchronous method
    returns (each `send_*` method has one), so nothing is decided twice.
    """

    __slots__ = ("_store", "_again", "_parse", "_conn", "_value", "_error", "_done")

    def __init__(self, store: RedisKeyStore | None, again: Callable[[], Any] | None, parse: Callable[[Any], Any],
                 conn: Any) -> None:
        #: `again`: the same call made the ordinary way (`RedisKeyStore._call`), for when the reply is lost
        self._store, self._again, self._parse, self._conn = store, again, parse, conn
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = False

    @classmethod
    def ready(cls, value: Any) -> PendingReply:
        """A call with nothing to ask (no subjects): its result, no round trip."""
        reply = cls(None, None, _same, None)
        reply._value, reply._done = value, True
        return reply

    def result(self) -> Any:
        """The reply, parsed as the synchronous method parses it (read once; later calls return it again)."""
        if self._done:
            if self._error is not None:
                raise self._error
            return self._value
        store, again = self._store, self._again
        assert store is not None and again is not None  # only `ready` replies have none, and they are done
        raw: Any = None
        conn, self._conn = self._conn, None
        if conn is not None:
            pool = store.client.connection_pool
            try:
                raw = conn.read_response()
            except redis.exceptions.NoScriptError:
                pool.release(conn)  # an ordinary error reply: the connection is in step
                conn = None
            except redis.exceptions.ResponseError as exc:
                pool.release(conn)
                self._error, self._done, self._again = _unavailable(exc), True, None
                raise self._error from None
            except redis.RedisError:  # lost before the reply (or unreadable): never reuse this connection
                conn.disconnect()
                pool.release(conn)
                conn = None
            else:
                pool.release(conn)
        try:
            if conn is None:
                raw = again()
            self._value = self._parse(raw)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._done = True
            self._again = None  # what was sent (wrapped keys offered) is not kept past the reply
        return self._value

    def drop(self) -> None:
        """Forget a reply nobody will read: the connection is closed (its reply is still on the way)."""
        conn, self._conn = self._conn, None
        self._done, self._again = True, None
        if conn is not None and self._store is not None:
            conn.disconnect()
            self._store.client.connection_pool.release(conn)


class RedisKeyStore:
    """Wrapped-key persistence; every method is one round trip (or one script) to Redis."""

    def __init__(self, url: str, tenant: str, *, password_file: str | None = None) -> None:
        self.url = url
        self.tenant = tenant
        self.prefix = tenant_prefix(tenant)
        self.invalidate_channel = self.prefix + INVALIDATE_CHANNEL
        self.epoch_key = self.prefix + EPOCH_KEY
        self.compact_shreds_key = self.prefix + COMPACT_SHREDS_KEY
        self.compact_covered_key = self.prefix + COMPACT_COVERED_KEY
        self.legacy_compact_due_key = self.prefix + LEGACY_COMPACT_DUE_KEY
        self.client = redis_client(url, password_file, socket_timeout=5, socket_connect_timeout=5)
        self._tenant_keys = self.client.register_script(scripts.TENANT_KEYS)
        #: Requests made through `_call` (every method's round trip; a pipeline counts once), for the bench.
        self.round_trips = 0
        #: Of `round_trips`, those that loaded or created data keys (`get_or_create_dek(s)`, `dek_version`):
        #: what a data-key cache miss costs, apart from commits, policy attributions and erasure bookkeeping.
        self.data_key_round_trips = 0
        self._create_dek = self.client.register_script(scripts.CREATE_DEK)
        self._create_deks = self.client.register_script(scripts.CREATE_DEKS)
        self._get_deks = self.client.register_script(scripts.GET_DEKS)
        self._rotate_dek = self.client.register_script(scripts.ROTATE_DEK)
        self._shred = self.client.register_script(scripts.SHRED)
        self._shred_preview = self.client.register_script(scripts.SHRED_PREVIEW)
        self._compacted = self.client.register_script(scripts.COMPACTED)
        self._confirm_delivered = self.client.register_script(scripts.CONFIRM_DELIVERED)
        self._claim_pending = self.client.register_script(scripts.CLAIM_PENDING)
        self._record_activity = self.client.register_script(scripts.RECORD_ACTIVITY)
        self._subject_topics = self.client.register_script(scripts.SUBJECT_TOPICS)
        self._schedule_erasures = self.client.register_script(scripts.SCHEDULE_ERASURES)
        self._root_changed = self.client.register_script(scripts.ROOT_CHANGED)
        self._claim_due = self.client.register_script(scripts.CLAIM_DUE)
        self._add_version = self.client.register_script(scripts.ADD_VERSION)
        self._install_handover = self.client.register_script(scripts.INSTALL_HANDOVER_KEK)
        self._retire_below_floor = self.client.register_script(scripts.RETIRE_BELOW_FLOOR)
        self._rewrap_dek = self.client.register_script(scripts.REWRAP_DEK)

    def __repr__(self) -> str:
        return "RedisKeyStore(<redis>)"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.round_trips += 1
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def _send(self, script: Any, keys: list[str], args: list[Any], parse: Callable[[Any], Any]) -> PendingReply:
        """Send a script call now and read its reply later (`PendingReply`); one round trip either way."""
        return self._send_command(("EVALSHA", script.sha, len(keys), *keys, *args),
                                  lambda: self._call(script, keys=keys, args=args), parse)

    def _send_command(self, command: tuple[Any, ...], again: Callable[[], Any],
                      parse: Callable[[Any], Any]) -> PendingReply:
        """Send `command` now and read its reply later; `again` makes the same call the ordinary way."""
        self.round_trips += 1
        pool = self.client.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            conn.send_command(*command)
        except redis.RedisError:
            if conn is not None:  # nothing reads this connection's reply: it must not go back half-used
                conn.disconnect()
                pool.release(conn)
            conn = None  # `result` makes the call the ordinary way (the client's retries, the script loaded)
        return PendingReply(self, again, parse, conn)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- the audit chain's second store (guard.audit, docs/audit.md) -------------------------------
    def audit_checkpoints_key(self, audit_topic: str) -> str:
        """The second store of an audit topic's checkpoints, under the tenant's prefix (its Redis ACL)."""
        return self._k("audit-ckpt", audit_topic)

    def put_audit_checkpoints(self, audit_topic: str, notes: list[tuple[str, int, str]]) -> None:
        """Keep signed checkpoints (chain, tree size, note) outside Kafka; one field per chain and size."""
        self.send_audit_checkpoints(audit_topic, notes).result()

    def send_audit_checkpoints(self, audit_topic: str, notes: list[tuple[str, int, str]]) -> PendingReply:
        """`put_audit_checkpoints`, its reply read later (`PendingReply.result`)."""
        if not notes:
            return PendingReply.ready(0)
        key = self.audit_checkpoints_key(audit_topic)
        fields = {f"{chain} {size}": note for chain, size, note in notes}
        return self._send_command(("HSET", key, *(x for pair in fields.items() for x in pair)),
                                  lambda: self._call(self.client.hset, key, mapping=fields), _same)

    def audit_checkpoints(self, audit_topic: str) -> dict[str, str]:
        """Every kept checkpoint of the chains writing `audit_topic`: "{chain} {size}" → signed note."""
        raw = self._call(self.client.hgetall, self.audit_checkpoints_key(audit_topic))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # --- branch and tenant keys -------------------------------------------------------------------
    def kek_versions(self, branch: str) -> tuple[int, dict[int, bytes]]:
        raw = self._call(self.client.hgetall, self._k("kek", branch))
        current = int(raw.pop(b"current", b"0"))
        return current, {int(k[1:]): v for k, v in raw.items() if k.startswith(b"v") and k[1:].isdigit()}

    def kek_handover(self, branch: str) -> tuple[int, str | None]:
        """(floor, handover) of the branch key: versions below `floor` are being retired by the transfer
        `handover` names ("<transfer id> <version>"); (0, None) when no transfer ever installed a key."""
        floor, handover = self._call(self.client.hmget, self._k("kek", branch), ["floor", "handover"])
        return int(floor or 0), None if handover is None else handover.decode()

    def install_handover_kek(self, branch: str, transfer_id: str, seen_current: int, wrapped: bytes) -> int:
        """Make `wrapped` (version `seen_current` + 1) the branch's current key and its floor, once per
        transfer: -1 if the current version is no longer `seen_current` (wrap again), -2 if another
        transfer's handover is in progress, else the version (the one installed before, on a rerun)."""
        return int(self._call(self._install_handover, keys=[self._k("kek", branch)],
                              args=[transfer_id, seen_current, wrapped]))

    def retire_kek_below_floor(self, branch: str) -> int:
        """Delete every branch-key version below the floor (after no data key is wrapped under one)."""
        return int(self._call(self._retire_below_floor, keys=[self._k("kek", branch)]))

    def end_kek_handover(self, branch: str, transfer_id: str) -> None:
        """Forget the handover marker of `transfer_id` (the floor stays: retired versions stay refused)."""
        name = self._k("kek", branch)
        handover = self._call(self.client.hget, name, "handover")
        if handover is not None and handover.decode().split(" ", 1)[0] == transfer_id:
            self._call(self.client.hdel, name, "handover")

    def publish_branch_invalidation(self, branch: str) -> None:
        """Tell every worker to drop its cached branch keys of `branch` (message `<branch>:`)."""
        self._call(self.client.publish, self.invalidate_channel, f"{branch}:")

    def dek_subjects(self, branch: str) -> list[str]:
        """Every subject of the branch that has a data key (SCAN over `dek:{branch}:*`), sorted."""
        prefix = self._k("dek", branch, "")
        found: set[str] = set()
        cursor = 0
        while True:
            cursor, names = self._call(self.client.scan, cursor, match=prefix + "*", count=1000)
            found.update(n.decode()[len(prefix):] for n in names)
            if int(cursor) == 0:
                return sorted(found)

    def dek_fields(self, branch: str, subject: str) -> dict[str, bytes]:
        """The subject's data-key versions as stored: `v<n>` → wrapped key."""
        raw = self._call(self.client.hgetall, self._k("dek", branch, subject))
        return {k.decode(): bytes(v) for k, v in raw.items() if k.startswith(b"v")}

    def rewrap_dek(self, branch: str, subject: str, changes: list[tuple[str, bytes, bytes]]) -> int:
        """Replace wrapped versions (field, expected, new) all at once if none changed: 0 if one did,
        -1 if the subject was erased meanwhile, else how many were replaced."""
        args = [x for change in changes for x in change]
        return int(self._call(self._rewrap_dek, keys=[self._k("dek", branch, subject),
                                                      self._k("erased", branch, subject)], args=args))

    def add_kek_version(self, branch: str, wrapped: bytes) -> int:
        return int(self._call(self._add_version, keys=[self._k("kek", branch)], args=[wrapped]))

    def create_kek_if_absent(self, branch: str, wrapped: bytes) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self._k("kek", branch), "v1", wrapped)
        pipe.hsetnx(self._k("kek", branch), "current", 1)
        pipe.sadd(self._k("branches"), branch)
        self._call(pipe.execute)

    def tenant_keys(self, wrapped_if_absent: dict[str, bytes]) -> dict[str, bytes]:
        """The tenant's keys by purpose: minted together on a tenant without data, else read.

        Raises `TenantKeyMissingError` when the tenant has key-store data but one of these keys is gone.
        """
        purposes = list(wrapped_if_absent)
        args: list[Any] = [int(time.time())]
        for p in purposes:
            args += [p, wrapped_if_absent[p]]
        result = self._call(self._tenant_keys,
                            keys=[self._k("tenant"), self._k("branches"), *(self._k("tkey", p) for p in purposes)],
                            args=args)
        if int(result[0]) != 1:
            raise TenantKeyMissingError(self.tenant, [m.decode() for m in result[1:]])
        return {p: bytes(v) for p, v in zip(purposes, result[1:], strict=True)}

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        """Purposes whose tenant key is absent (one round trip; a running worker's periodic check)."""
        pipe = self.client.pipeline(transaction=False)
        for p in purposes:
            pipe.exists(self._k("tkey", p))
        found = self._call(pipe.execute)
        return [p for p, n in zip(purposes, found, strict=True) if not n]

    # --- data-subject keys ------------------------------------------------------------------------
    def get_or_create_dek(self, branch: str, subject: str, wrapped_if_absent: bytes) -> tuple[int, bytes] | None:
        """(version, wrapped key) of the subject's current key; None if the subject was erased."""
        self.data_key_round_trips += 1
        version, wrapped = self._call(
            self._create_dek,
            keys=[self._k("dek", branch, subject), self._k("erased", branch, subject), self._k("kek", branch)],
            args=[wrapped_if_absent, int(time.time())],
        )
        if version == -2:
            raise StaleBranchKeyError(branch)
        if version == -1:
            return None
        return int(version), bytes(wrapped)

    def get_or_create_deks(
        self, branch: str, items: list[tuple[str, bytes]]
    ) -> list[tuple[int, bytes] | None]:
        """`get_or_create_dek` for many subjects in one round trip and one script call (a batch's key
        prefetch); None for an erased subject. Keys must all be wrapped under the same branch-key version."""
        return self.send_get_or_create_deks(branch, items).result()

    def send_get_or_create_deks(self, branch: str, items: list[tuple[str, bytes]]) -> PendingReply:
        """`get_or_create_deks`, its reply read later (`PendingReply.result`, which raises
        `StaleBranchKeyError` where `get_or_create_deks` does)."""
        if not items:
            return PendingReply.ready([])
        self.data_key_round_trips += 1

        def parse(flat: list[Any]) -> list[tuple[int, bytes] | None]:
            if len(flat) == 1:
                raise StaleBranchKeyError(branch)  # nothing was created: a retry re-wraps under the current key
            out: list[tuple[int, bytes] | None] = []
            for (_, offered), version, stored in zip(items, flat[0::2], flat[1::2], strict=True):
                if version == -1:
                    out.append(None)
                else:  # `stored` is None where this call stored the key it was given
                    out.append((int(version), offered if stored is None else bytes(stored)))
            return out

        return self._send(self._create_deks, [self._k("kek", branch)],
                          [int(time.time()), self._k("dek", branch, ""), self._k("erased", branch, ""),
                           orjson.dumps([subject for subject, _ in items]), *(w for _, w in items)], parse)

    def get_deks(self, branch: str, subjects: list[str]) -> tuple[dict[str, tuple[int, bytes]], list[str], list[str]]:
        """The current keys of `subjects` in one round trip, creating none: (subject → (version, wrapped key)
        of those that have one, the erased subjects, the subjects without a key yet)."""
        return self.send_get_deks(branch, subjects).result()

    def send_get_deks(self, branch: str, subjects: list[str]) -> PendingReply:
        """`get_deks`, its reply read later (`PendingReply.result`)."""
        if not subjects:
            return PendingReply.ready(({}, [], []))
        self.data_key_round_trips += 1

        def parse(flat: list[Any]) -> tuple[dict[str, tuple[int, bytes]], list[str], list[str]]:
            found: dict[str, tuple[int, bytes]] = {}
            erased: list[str] = []
            missing: list[str] = []
            for subject, version, wrapped in zip(subjects, flat[0::2], flat[1::2], strict=True):
                if version > 0:
                    found[subject] = (version, bytes(wrapped))
                elif version == -1:
                    erased.append(subject)
                else:
                    missing.append(subject)
            return found, erased, missing

        return self._send(self._get_deks, [], [self._k("dek", branch, ""), self._k("erased", branch, ""),
                                               orjson.dumps(subjects)], parse)

    def dek_version(self, branch: str, subject: str, version: int) -> bytes | None:
        self.data_key_round_trips += 1
        value = self._call(self.client.hget, self._k("dek", branch, subject), f"v{version}")
        return None if value is None else bytes(value)

    def rotate_dek(self, branch: str, subject: str, wrapped: bytes) -> int | None:
        result = int(
            self._call(
                self._rotate_dek,
                keys=[self._k("dek", branch, subject), self._k("erased", branch, subject), self._k("kek", branch)],
                args=[wrapped],
            )
        )
        if result == -2:
            raise StaleBranchKeyError(branch)
        self.publish_invalidation(branch, subject)
        return None if result == -1 else result

    def shred_preview(self, branch: str, subject: str) -> tuple[int, bool]:
        """(how many key versions the subject has, whether it is already erased), read atomically."""
        versions, erased = self._call(
            self._shred_preview, keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)])
        return int(versions), bool(erased)

    def shred(self, branch: str, subject: str, record: bytes, *, expected_versions: int,
              pending: bytes | None, held: tuple[bytes, bytes] | None = None) -> ShredOutcome:
        """Destroy every version of the subject's key, atomically with what must survive it.

        One Lua script: refuses a held subject (`held`) and a subject whose number of key versions is no
        longer `expected_versions` (`changed`: a rotation raced; preview again), else deletes the key,
        writes the erased marker (blocks re-creation), stores `pending` (the confirmation to deliver,
        `pending_confirmations`), drops the subject's retention expiry, counts the shred in the erasure
        epoch and (when a key was destroyed) in the compaction's shred count, and publishes the
        invalidation. A subject already erased with no key left is not touched (`already`).

        `held`: (the deferred erasure, the held confirmation's pending entry) for a subject under legal hold:
        the script records the erasure as deferred (`storage_only`, carried out at the hold's release), removes
        the subject's scheduled erasure and keeps the confirmation pending, in the same call as the hold check.
        Without it a held subject's schedule stays (it is claimed again after its lease).
        """
        versions, already, epoch = self._call(
            self._shred,
            keys=[self._k("dek", branch, subject), self._k("erased", branch, subject), self._k("pending", branch),
                  self.epoch_key, self.compact_shreds_key, self._k("expiry", branch), self._k("hold", branch),
                  self._k("erasure-due", branch), self._k("erasure-due-info", branch),
                  self._k("storage-only", branch, subject)],
            args=[record, subject, expected_versions, pending or b"", self.invalidate_channel, f"{branch}:{subject}",
                  *(held or (b"", b""))],
        )
        versions = int(versions)
        status = {-2: "held", -1: "changed"}.get(versions)
        if status is None:
            status = "already" if versions == 0 and already and not int(epoch) else "done"
        return ShredOutcome(status, max(versions, 0), bool(already), int(epoch))

    def erased_record(self, branch: str, subject: str) -> bytes | None:
        value = self._call(self.client.get, self._k("erased", branch, subject))
        return None if value is None else bytes(value)

    def erased_among(self, branch: str, subjects: list[str]) -> list[str]:
        """The subjects of `subjects` that are erased (one pipelined round trip)."""
        if not subjects:
            return []
        pipe = self.client.pipeline(transaction=False)
        for subject in subjects:
            pipe.exists(self._k("erased", branch, subject))
        found = self._call(pipe.execute)
        return [s for s, hit in zip(subjects, found, strict=True) if hit]

    def erasure_epoch(self) -> int:
        """How many shreds the key store has seen (every shred increments it, atomically with the shred)."""
        return int(self._call(self.client.get, self.epoch_key) or 0)

    # --- confirmations waiting for a committed transaction ---------------------------------------
    def pending_confirmations(self, branch: str) -> dict[str, bytes]:
        """subject → pending entry (JSON) of every confirmation not yet known to be delivered."""
        raw = self._call(self.client.hgetall, self._k("pending", branch))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    def pending_confirmation(self, branch: str, subject: str) -> bytes | None:
        value = self._call(self.client.hget, self._k("pending", branch), subject)
        return None if value is None else bytes(value)

    def claim_pending(self, branch: str, claims: Mapping[str, tuple[bytes, bytes]]) -> set[str]:
        """Take over pending entries to re-emit them: `subject → (entry as read, entry naming the claimer)`.

        Each is replaced only if it is still what was read (one script call), so of several workers that
        read the same entry one re-emits it. Returns the subjects claimed."""
        if not claims:
            return set()
        args = [x for subject, (read, claimed) in claims.items() for x in (subject, read, claimed)]
        won = self._call(self._claim_pending, keys=[self._k("pending", branch)], args=args)
        return {w.decode() if isinstance(w, bytes) else str(w) for w in won}

    def confirm_delivered(self, branch: str, delivered: dict[str, str]) -> int:
        """Forget the pending entries `subject → confirmation id` that a committed write now carries."""
        if not delivered:
            return 0
        args = [x for pair in delivered.items() for x in pair]
        return int(self._call(self._confirm_delivered, keys=[self._k("pending", branch)], args=args))

    # --- append-only file compaction ---------------------------------------------------------------
    def compaction_due(self) -> int:
        """Shreds since the last completed append-only-file rewrite (0: the files hold no destroyed key)."""
        shreds, covered, legacy = self.compaction_counts()
        return max(shreds - covered, 0) + legacy

    def compaction_counts(self) -> tuple[int, int, int]:
        """(shreds counted, shreds a completed rewrite covers, legacy counter not below 0), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for key in (self.compact_shreds_key, self.compact_covered_key, self.legacy_compact_due_key):
            pipe.get(key)
        shreds, covered, legacy = self._call(pipe.execute)
        return int(shreds or 0), int(covered or 0), max(int(legacy or 0), 0)

    def compact(self, *, timeout_s: float = 300.0, poll_s: float = 0.05) -> bool:
        """Make sure an append-only-file rewrite that *started after this call* completes.

        A rewrite already running when a key was destroyed may have forked before the delete and then
        still holds the wrapped key, and Redis refuses BGREWRITEAOF while one runs. So: wait until no
        rewrite runs, start one (or have Redis schedule it behind a running RDB save), and wait until the
        rewrite counter has moved past it with status `ok`; a failed rewrite is started again. Returns
        True when done (and records the shreds counted before it started as covered), False when
        append-only persistence is off (nothing to compact). Raises `KeyUnavailableError` on a Redis
        error or after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        # Read before the rewrite is started, so every shred counted here precedes its fork.
        shreds, _covered, legacy = self.compaction_counts()
        while True:
            info = self._call(self.client.info, "persistence")
            if not int(info.get("aof_enabled", 0)):
                return False
            if int(info.get("aof_rewrite_in_progress", 0)) or int(info.get("aof_rewrite_scheduled", 0)):
                self._wait(deadline, poll_s, "a running append-only-file rewrite to finish")
                continue
            before = int(info.get("aof_rewrites", 0))
            try:
                self.client.bgrewriteaof()
            except redis.ResponseError:
                continue  # another client started one between INFO and here: wait for it, then ours
            except redis.RedisError as exc:
                raise KeyUnavailableError(f"key store unreachable ({type(exc).__name__}) while compacting") from None
            while True:
                info = self._call(self.client.info, "persistence")
                counted = "aof_rewrites" not in info or int(info["aof_rewrites"]) > before
                if (counted and not int(info.get("aof_rewrite_in_progress", 0))
                        and not int(info.get("aof_rewrite_scheduled", 0))):
                    break
                self._wait(deadline, poll_s, "the append-only-file rewrite to complete")
            if info.get("aof_last_bgrewrite_status") == "ok":
                self._call(self._compacted, keys=[self.compact_covered_key, self.legacy_compact_due_key],
                           args=[shreds, legacy])
                return True

    @staticmethod
    def _wait(deadline: float, poll_s: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise KeyUnavailableError(f"timed out waiting for {what}; check the Redis log (disk space, "
                                      "permissions of the append-only directory)")
        time.sleep(poll_s)

    # --- legal hold -------------------------------------------------------------------------------
    def set_hold(self, branch: str, subject: str, held: bool) -> None:
        fn = self.client.sadd if held else self.client.srem
        self._call(fn, self._k("hold", branch), subject)

    def is_held(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.sismember, self._k("hold", branch), subject))

    def set_storage_only(self, branch: str, subject: str, deferred: bytes) -> None:
        """Record the erasure a legal hold deferred (JSON: confirmation id, trigger, reason, by)."""
        self._call(self.client.set, self._k("storage-only", branch, subject), deferred)

    def storage_only(self, branch: str, subject: str) -> bytes | None:
        """The deferred erasure of a storage-only subject, or None."""
        value = self._call(self.client.get, self._k("storage-only", branch, subject))
        return None if value is None else bytes(value)

    def clear_storage_only(self, branch: str, subject: str) -> None:
        self._call(self.client.delete, self._k("storage-only", branch, subject))

    def is_storage_only(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.exists, self._k("storage-only", branch, subject)))

    # --- attribution of deletes (docs/policy.md) -------------------------------------------------------
    def record_attribution(self, branch: str, tx_id: int | str, principal: str) -> None:
        """Remember that source transaction `tx_id` named `principal` ("" for none), for ATTRIBUTION_TTL_S.

        `tx_id` is PostgreSQL's xid or MariaDB's GTID ("0-1-42"); keys are per branch, so the two never meet.

        Shared by every worker: the message and the deletes of one transaction are on different topics,
        which different workers may own. Idempotent (a set), so a replayed message changes nothing.
        """
        self.exchange_attributions(branch, [(tx_id, principal)], ())

    def exchange_attributions(self, branch: str, recorded: Iterable[tuple[int | str, str]],
                              wanted: Iterable[int | str]) -> dict[int | str, set[str]]:
        """A batch's attributions in one round trip: record each (tx_id, principal) of `recorded` (as
        `record_attribution`), then the principals of each of `wanted` (as `attributions`: absent when no
        message was seen). The records go first, so a delete whose message is in the same batch finds it."""
        pipe = self.client.pipeline(transaction=True)
        skip = 0
        for tx_id, principal in recorded:
            name = self._k("attrib", branch, str(tx_id))
            pipe.sadd(name, principal)
            pipe.expire(name, ATTRIBUTION_TTL_S)
            skip += 2
        wanted = list(wanted)
        for tx_id in wanted:
            pipe.smembers(self._k("attrib", branch, str(tx_id)))
        if not skip and not wanted:
            return {}
        found = self._call(pipe.execute)[skip:]
        return {tx_id: {m.decode() if isinstance(m, bytes) else str(m) for m in members}
                for tx_id, members in zip(wanted, found, strict=True) if members}

    def attributions(self, branch: str, tx_ids: list[int | str]) -> dict[int | str, set[str]]:
        """The principals recorded for each of `tx_ids` (absent: no message seen yet), in one round trip."""
        return self.exchange_attributions(branch, (), tx_ids)

    # --- where a subject's ciphertexts went (for deletion confirmations) --------------------------
    def record_subject_activity(self, branch: str, activity: Mapping[tuple[str, str], int | None]) -> None:
        """Remember where each subject's ciphertexts went and push back its retention expiry.

        `activity`: (subject, topic) → seconds from now until the subject's retention runs out, or None
        to leave its expiry as it is. One script call per transaction, whatever the number of events in
        it, with one `SADD` per topic; subjects erased meanwhile get no expiry, so an erasure is never
        followed by another one from the retention sweep.
        """
        self.send_subject_activity(branch, activity).result()

    def send_subject_activity(self, branch: str, activity: Mapping[tuple[str, str], int | None]) -> PendingReply:
        """`record_subject_activity`, its reply read later (`PendingReply.result`)."""
        if not activity:
            return PendingReply.ready(0)
        by_topic: dict[str, list[str]] = {}
        expiries: list[tuple[str, int]] = []
        now = int(time.time())
        for (subject, topic), retention_s in activity.items():
            by_topic.setdefault(topic, []).append(subject)
            if retention_s is not None:
                expiries.append((subject, now + retention_s))
        return self._send(self._record_activity, [self._k("expiry", branch), self._k("activity-topics", branch)],
                          [self._k("on-topic", branch, ""), self._k("erased", branch, ""), orjson.dumps(by_topic),
                           orjson.dumps(expiries)], _same)

    def commit_view(self, branch: str, schedules: Mapping[str, tuple[float, bytes]] | None = None) -> tuple[int, int]:
        """(erasure epoch, scheduled erasures + retention expiries): what a commit must check, in one script call
        that first schedules the transaction's erasures (`schedules`, as `schedule_erasures` does), so the view
        counts them: a re-insert later in the batch must find its erasure scheduled to cancel it (a commit used
        to make these two round trips one after the other)."""
        _, epoch, due, expiring = self._schedule(branch, schedules or {})
        return int(epoch), int(due) + int(expiring)

    def set_expiry(self, branch: str, expiries: Mapping[str, float | None]) -> None:
        """Set (or, for None, remove) subjects' retention expiry: when the relationship end says so (the
        expiry half of `root_changed`, one script call)."""
        if expiries:
            self.root_changed(branch, [], expiries)

    def schedule_erasures(self, branch: str, schedules: Mapping[str, tuple[float, bytes]]) -> int:
        """Schedule subjects' erasures: subject → (due, info), in one script call. A subject erased or already
        scheduled keeps what it has (an earlier schedule stands). Returns how many were scheduled."""
        if not schedules:
            return 0
        return int(self._schedule(branch, schedules)[0])

    def _schedule(self, branch: str, schedules: Mapping[str, tuple[float, bytes]]) -> list[Any]:
        args: list[Any] = [self._k("erased", branch, "")]
        for subject, (due, info) in schedules.items():
            args += [subject, due, info]
        keys = [self._k("erasure-due", branch), self._k("erasure-due-info", branch), self.epoch_key,
                self._k("expiry", branch)]
        return list(self._call(self._schedule_erasures, keys=keys, args=args))

    def due_erasures(self, branch: str, now: float, *, lease_s: float = 120.0, limit: int = 100) -> dict[str, bytes]:
        """Claim the erasures due by `now`: subject → schedule info. A claimed erasure is not handed to
        another worker for `lease_s` (one shred, one confirmation); one whose claimer crashed is due again
        after it."""
        flat = self._call(self._claim_due, keys=[self._k("erasure-due", branch), self._k("erasure-due-info", branch)],
                          args=[now, now + lease_s, limit])
        return {flat[i].decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    def root_changed(self, branch: str, subjects: list[str],
                     expiries: Mapping[str, float | None] | None = None) -> tuple[list[str], list[str]]:
        """Root rows back for `subjects`: (scheduled erasures cancelled, relationship retentions stopped).

        With `expiries`, they are set (or, for None, removed) after it in the same script call: a commit
        used to make the two calls one after the other.
        """
        if not subjects and not expiries:
            return [], []
        args: list[Any] = [len(subjects), *subjects]
        for subject, at in (expiries or {}).items():
            args += [subject, "" if at is None else repr(float(at))]
        cancelled, resumed = self._call(self._root_changed, keys=[
            self._k("erasure-due", branch), self._k("erasure-due-info", branch), self._k("expiry", branch)],
            args=args)
        return [c.decode() for c in cancelled], [r.decode() for r in resumed]

    def expired_subjects(self, branch: str, now: float, limit: int = 1000) -> list[str]:
        """Subjects whose retention ran out by `now` (oldest first)."""
        found = self._call(self.client.zrangebyscore, self._k("expiry", branch), "-inf", now, start=0, num=limit)
        return [m.decode() for m in found]

    def forget_expiry(self, branch: str, subject: str) -> None:
        self._call(self.client.zrem, self._k("expiry", branch), subject)

    def subject_topics(self, branch: str, subject: str) -> set[str]:
        """The sanitized topics that hold the subject's ciphertexts (one script call)."""
        return {m.decode() for m in self._call(self._read_subject_topics, branch, subject, client=None)}

    def _read_subject_topics(self, branch: str, subject: str, client: Any) -> Any:
        """The `scripts.SUBJECT_TOPICS` call, on the client or queued on a pipeline (`client`)."""
        return self._subject_topics(keys=[self._k("activity-topics", branch), self._k("topics", branch, subject)],
                                    args=[self._k("on-topic", branch, ""), subject], client=client)

    # --- a subject's records on compacted sanitized topics (erasure writes tombstones for them) --------
    def record_compacted_key(self, branch: str, subject: str, topic: str, partition: int, key: bytes) -> None:
        """Remember that `subject`'s latest record under `key` sits on compacted `topic`, `partition`.

        Two maps, one round trip: the subject's (topic, partition, key) set, and per topic which subject
        each key's latest record belongs to (a row that moved to another customer is no longer the
        erased customer's to tombstone). Keys are sanitized Kafka keys (tokens), never plaintext.
        """
        member = _compacted_member(topic, partition, key)
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(self._k("ckeys", branch, subject), member)
        pipe.hset(self._k("ckey-owner", branch), member, subject)
        self._call(pipe.execute)

    def compacted_keys(self, branch: str, subject: str) -> list[tuple[str, int, bytes]]:
        """(topic, partition, key) of the subject's latest records on compacted topics (still its own)."""
        members = self._call(self.client.smembers, self._k("ckeys", branch, subject))
        return self._owned_compacted(branch, subject, members)

    def erasure_view(self, branch: str, subject: str) -> ErasureView:
        """Everything an erasure reads before its shred, in one pipelined round trip (a second one only
        for a subject with records on compacted topics, for their keys' owners): an erasure used to read
        the topics, the preview and the compacted keys one round trip each, with the stream waiting
        (docs/benchmark.md, round 18). Not atomic, as the separate reads were not: the shred checks
        the key versions again (`expected_versions`) and the caller previews again if they changed."""
        pipe = self.client.pipeline(transaction=False)
        self._read_subject_topics(branch, subject, client=pipe)
        self._shred_preview(keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)], client=pipe)
        pipe.smembers(self._k("ckeys", branch, subject))
        topics, (versions, erased), members = self._call(pipe.execute)
        return ErasureView(frozenset(m.decode() for m in topics), int(versions), bool(erased),
                           self._owned_compacted(branch, subject, members))

    def _owned_compacted(self, branch: str, subject: str, found: Iterable[bytes]) -> list[tuple[str, int, bytes]]:
        """The members of a subject's compacted-keys set whose key the subject still owns (one round trip
        for the owners, none for an empty set), parsed."""
        members = sorted(found)
        if not members:
            return []
        owners = self._call(self.client.hmget, self._k("ckey-owner", branch), members)
        out = []
        for member, owner in zip(members, owners, strict=True):
            if owner is not None and owner.decode() == subject:
                topic, partition, key = _parse_compacted_member(bytes(member))
                out.append((topic, partition, key))
        return out

    def name(self, *parts: str) -> str:
        """The Redis name of a key owned by another part of the guard (the reveal service's tokens and rate
        windows: `bg:{tenant}:reveal:…`), so every name the guard uses comes from the key store's one layout
        and stays inside the tenant's Redis ACL patterns."""
        return self._k(*parts)

    def alert_once(self, key: str, ttl_s: int = 86_400) -> bool:
        """True for the first caller across all workers within `ttl_s` (alert deduplication)."""
        return bool(self._call(self.client.set, self._k("alerted", key), 1, nx=True, ex=ttl_s))

    # --- cache invalidation -----------------------------------------------------------------------
    def publish_invalidation(self, branch: str, subject: str) -> None:
        self._call(self.client.publish, self.invalidate_channel, f"{branch}:{subject}")

    def is_restricted(self, branch: str, subject: str) -> bool:
        """Whether the subject is under legal hold or storage-only (its data may be stored, not revealed)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sismember(self._k("hold", branch), subject)
        pipe.exists(self._k("storage-only", branch, subject))
        held, storage_only = self._call(pipe.execute)
        return bool(held) or bool(storage_only)


def _compacted_member(topic: str, partition: int, key: bytes) -> bytes:
    t = topic.encode()
    return struct.pack(">II", len(t), partition) + t + key


def _parse_compacted_member(member: bytes) -> tuple[str, int, bytes]:
    length, partition = struct.unpack_from(">II", member)
    return member[8:8 + length].decode(), partition, member[8 + length:]
