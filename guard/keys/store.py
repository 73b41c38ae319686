"""Durable, shared storage of wrapped keys in Redis.

Only wrapped (encrypted) keys are stored; unwrapping needs the KMS master key, which Redis never sees.
Every worker of a deployment talks to the same Redis, so they share keys: the first worker that needs a
data subject's key creates it atomically (a Lua script), the others read the winner's key.

Redis layout: every name starts with `bg:{tenant}:` (the tenant's prefix), so one Redis ACL user per
tenant can be limited to its own keys (`~bg:{tenant}:*`) and channel (`&bg:{tenant}:*`):

    bg:{t}:tenant                   hash  purpose → unix s: which tenant keys were ever minted (the registry)
    bg:{t}:branches                 set   branches that have a branch key (data exists for the tenant)
    bg:{t}:kek:{branch}             hash  current → n, v<n> → branch key wrapped by the master key
    bg:{t}:tkey:{purpose}           str   tenant key (blind index, keyed hash, quarantine) wrapped by the master key
    bg:{t}:dek:{branch}:{subject}   hash  current → n, v<n> → data key wrapped by the branch key, created → unix s
    bg:{t}:erased:{branch}:{subject} str  JSON shred record; blocks re-creation of the subject's key
    bg:{t}:hold:{branch}            set   subject tokens under legal hold (storage-only instead of shred)
    bg:{t}:storage-only:{b}:{s}     str   set when an erasure met a legal hold (PIPL Art. 47 para. 2)
    bg:{t}:topics:{branch}:{subject} set  sanitized topics holding the subject's ciphertexts
    bg:{t}:expiry:{branch}          zset  subject → unix time its retention runs out (last change + retention)
    bg:{t}:alerted:{key}            str   alert deduplication across workers (expires)
    bg:{t}:invalidate               pub/sub channel: "{branch}:{subject}" after a shred or rotation

Tenant keys fail closed: they are minted once, together, and only for a tenant without any key-store data
(no registry, no branch key). If the registry or a branch key exists but a tenant key is gone, minting a
new one would make every blind index, keyed hash and quarantined record of the tenant unmatched and let
erasures "succeed" on keys that were never used, so `tenant_keys` raises `TenantKeyMissingError` instead.

Durability: the stack runs Redis with `appendonly yes` and `appendfsync always`, so a key acknowledged
here is on disk before any record encrypted under it is committed to Kafka. Deleted keys can linger in
the append-only file until it is rewritten; `shred` calls BGREWRITEAOF for that reason (see README).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from guard.config import read_secret_file
from guard.errors import KeyUnavailableError, TenantKeyMissingError

_CREATE_DEK = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, false} end
local cur = redis.call('HGET', KEYS[1], 'current')
if cur then return {tonumber(cur), redis.call('HGET', KEYS[1], 'v' .. cur)} end
redis.call('HSET', KEYS[1], 'current', 1, 'v1', ARGV[1], 'created', ARGV[2])
return {1, ARGV[1]}
"""

_ROTATE_DEK = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
local nxt = cur + 1
redis.call('HSET', KEYS[1], 'current', nxt, 'v' .. nxt, ARGV[1])
return nxt
"""

_SHRED = """
local versions = 0
local fields = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(fields) do if string.sub(f, 1, 1) == 'v' then versions = versions + 1 end end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[1]) end
return versions
"""

_ADD_VERSION = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
local nxt = cur + 1
redis.call('HSET', KEYS[1], 'current', nxt, 'v' .. nxt, ARGV[1])
return nxt
"""

# KEYS: registry, branches, tkey<purpose>...; ARGV: now, then (purpose, wrapped) pairs in KEYS order.
# Returns {1, v1, v2, ...} (all present or all minted now) or {-1, missing purposes...} (fail closed).
_TENANT_KEYS = """
local n = #KEYS - 2
local values, missing, present = {}, {}, 0
for i = 1, n do
  local v = redis.call('GET', KEYS[i + 2])
  values[i] = v
  if v then present = present + 1 else table.insert(missing, ARGV[2 * i]) end
end
if present == n then return {1, unpack(values)} end
if present > 0 or redis.call('EXISTS', KEYS[1]) == 1 or redis.call('SCARD', KEYS[2]) > 0 then
  return {-1, unpack(missing)}
end
for i = 1, n do
  redis.call('SET', KEYS[i + 2], ARGV[2 * i + 1])
  redis.call('HSET', KEYS[1], ARGV[2 * i], ARGV[1])
  values[i] = ARGV[2 * i + 1]
end
return {1, unpack(values)}
"""


class _FileCredentials(redis.CredentialProvider):
    """Username from the URL, password read from its 0600 file at every (re)connection (rotation-safe)."""

    def __init__(self, username: str, path: str) -> None:
        self.username = username
        self.path = path

    def get_credentials(self) -> tuple[str, str]:
        return self.username, read_secret_file(self.path, "Redis password (GUARD_REDIS_PASSWORD_FILE)")


def redis_client(url: str, password_file: str | None = None, **kwargs: Any) -> redis.Redis:
    """A Redis client for `url` (`rediss://user@host:port/db?ssl_ca_certs=...`), password from a file.

    `password_file` defaults to GUARD_REDIS_PASSWORD_FILE, then to the setting's default (the local stack's
    file). A password inside the URL is used as is (not recommended: URLs end up in process listings and logs).
    """
    from guard.config import Settings

    parts = urlsplit(url)
    password_file = password_file or os.environ.get("GUARD_REDIS_PASSWORD_FILE") or Settings().redis_password_file
    if parts.password is not None or not parts.username or not password_file:
        return redis.Redis.from_url(url, **kwargs)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return redis.Redis.from_url(bare, credential_provider=_FileCredentials(unquote(parts.username), password_file),
                                **kwargs)


def tenant_prefix(tenant: str) -> str:
    """`bg:{tenant}:`: every key and channel of the tenant starts with it (its Redis ACL pattern)."""
    if not tenant or any(c in tenant for c in ":*?[]{} "):
        raise ValueError(f"tenant {tenant!r} must be non-empty without ':', spaces or glob characters")
    return f"bg:{tenant}:"


class RedisKeyStore:
    """Wrapped-key persistence; every method is one round trip (or one script) to Redis."""

    def __init__(self, url: str, tenant: str, *, password_file: str | None = None) -> None:
        self.url = url
        self.tenant = tenant
        self.prefix = tenant_prefix(tenant)
        self.invalidate_channel = self.prefix + "invalidate"
        self.client = redis_client(url, password_file, socket_timeout=5, socket_connect_timeout=5)
        self._tenant_keys = self.client.register_script(_TENANT_KEYS)
        self._create_dek = self.client.register_script(_CREATE_DEK)
        self._rotate_dek = self.client.register_script(_ROTATE_DEK)
        self._shred = self.client.register_script(_SHRED)
        self._add_version = self.client.register_script(_ADD_VERSION)

    def __repr__(self) -> str:
        return "RedisKeyStore(<redis>)"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise KeyUnavailableError(
                f"key store unreachable ({type(exc).__name__}); check GUARD_REDIS_URL, "
                "GUARD_REDIS_PASSWORD_FILE and that Redis runs"
            ) from None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- branch and tenant keys -------------------------------------------------------------------
    def kek_versions(self, branch: str) -> tuple[int, dict[int, bytes]]:
        raw = self._call(self.client.hgetall, self._k("kek", branch))
        current = int(raw.pop(b"current", b"0"))
        return current, {int(k[1:]): v for k, v in raw.items() if k.startswith(b"v")}

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
        version, wrapped = self._call(
            self._create_dek,
            keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)],
            args=[wrapped_if_absent, int(time.time())],
        )
        if version == -1:
            return None
        return int(version), bytes(wrapped)

    def get_or_create_deks(
        self, branch: str, items: list[tuple[str, bytes]]
    ) -> list[tuple[int, bytes] | None]:
        """`get_or_create_dek` for many subjects in one pipelined round trip (a batch's key prefetch)."""
        now = int(time.time())
        pipe = self.client.pipeline(transaction=False)
        for subject, wrapped in items:
            self._create_dek(keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)],
                             args=[wrapped, now], client=pipe)
        results = self._call(pipe.execute)
        return [None if int(version) == -1 else (int(version), bytes(wrapped)) for version, wrapped in results]

    def dek_version(self, branch: str, subject: str, version: int) -> bytes | None:
        value = self._call(self.client.hget, self._k("dek", branch, subject), f"v{version}")
        return None if value is None else bytes(value)

    def rotate_dek(self, branch: str, subject: str, wrapped: bytes) -> int | None:
        result = int(
            self._call(
                self._rotate_dek,
                keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)],
                args=[wrapped],
            )
        )
        self.publish_invalidation(branch, subject)
        return None if result == -1 else result

    def shred(self, branch: str, subject: str, record: bytes) -> int:
        """Destroy every version of the subject's key; returns how many versions were destroyed."""
        destroyed = int(
            self._call(
                self._shred, keys=[self._k("dek", branch, subject), self._k("erased", branch, subject)], args=[record]
            )
        )
        self.publish_invalidation(branch, subject)
        return destroyed

    def erased_record(self, branch: str, subject: str) -> bytes | None:
        value = self._call(self.client.get, self._k("erased", branch, subject))
        return None if value is None else bytes(value)

    def compact(self) -> None:
        """Ask Redis to rewrite its append-only file so destroyed keys leave the disk too."""
        # A rewrite already in progress answers with an error; it won't contain the destroyed key either.
        with contextlib.suppress(redis.ResponseError):
            self.client.bgrewriteaof()

    # --- legal hold -------------------------------------------------------------------------------
    def set_hold(self, branch: str, subject: str, held: bool) -> None:
        fn = self.client.sadd if held else self.client.srem
        self._call(fn, self._k("hold", branch), subject)

    def is_held(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.sismember, self._k("hold", branch), subject))

    def set_storage_only(self, branch: str, subject: str, confirmation_id: str) -> None:
        self._call(self.client.set, self._k("storage-only", branch, subject), confirmation_id)

    def is_storage_only(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.exists, self._k("storage-only", branch, subject)))

    # --- where a subject's ciphertexts went (for deletion confirmations) --------------------------
    def record_subject_activity(self, branch: str, activity: dict[tuple[str, str], int]) -> None:
        """Remember where each subject's ciphertexts went and push back its retention expiry.

        One pipelined round trip per transaction, whatever the number of events in it.
        """
        if not activity:
            return
        now = int(time.time())
        pipe = self.client.pipeline(transaction=False)
        for (subject, topic), retention_s in activity.items():
            pipe.sadd(self._k("topics", branch, subject), topic)
            pipe.zadd(self._k("expiry", branch), {subject: now + retention_s}, gt=True)
        self._call(pipe.execute)

    def expired_subjects(self, branch: str, now: float, limit: int = 1000) -> list[str]:
        """Subjects whose retention ran out by `now` (oldest first)."""
        found = self._call(self.client.zrangebyscore, self._k("expiry", branch), "-inf", now, start=0, num=limit)
        return [m.decode() for m in found]

    def forget_expiry(self, branch: str, subject: str) -> None:
        self._call(self.client.zrem, self._k("expiry", branch), subject)

    def subject_topics(self, branch: str, subject: str) -> set[str]:
        return {m.decode() for m in self._call(self.client.smembers, self._k("topics", branch, subject))}

    def alert_once(self, key: str, ttl_s: int = 86_400) -> bool:
        """True for the first caller across all workers within `ttl_s` (alert deduplication)."""
        return bool(self._call(self.client.set, self._k("alerted", key), 1, nx=True, ex=ttl_s))

    # --- cache invalidation -----------------------------------------------------------------------
    def publish_invalidation(self, branch: str, subject: str) -> None:
        self._call(self.client.publish, self.invalidate_channel, f"{branch}:{subject}")
