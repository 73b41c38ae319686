"""Durable, shared storage of wrapped keys in Redis.

Only wrapped (encrypted) keys are stored; unwrapping needs the KMS master key, which Redis never sees.
Every worker of a deployment talks to the same Redis, so they share keys: the first worker that needs a
data subject's key creates it atomically (a Lua script), the others read the winner's key.

Redis layout (all names prefixed `bg:`):

    bg:kek:{branch}              hash  current → n, v<n> → branch key wrapped by the master key
    bg:tkey:{tenant}:{purpose}   str   tenant key (blind index, keyed hash, quarantine) wrapped by the master key
    bg:dek:{branch}:{subject}    hash  current → n, v<n> → data key wrapped by the branch key, created → unix s
    bg:erased:{branch}:{subject} str   JSON shred record; blocks re-creation of the subject's key
    bg:hold:{branch}             set   subject tokens under legal hold (storage-only instead of shred)
    bg:storage-only:{b}:{s}      str   set when an erasure met a legal hold (PIPL Art. 47 para. 2)
    bg:topics:{branch}:{subject} set   sanitized topics holding the subject's ciphertexts
    bg:expiry:{branch}           zset  subject → unix time its retention runs out (last change + retention)
    bg:alerted:{key}             str   alert deduplication across workers (expires)
    bg:invalidate                pub/sub channel: "{branch}:{subject}" after a shred or rotation

Durability: the stack runs Redis with `appendonly yes` and `appendfsync always`, so a key acknowledged
here is on disk before any record encrypted under it is committed to Kafka. Deleted keys can linger in
the append-only file until it is rewritten; `shred` calls BGREWRITEAOF for that reason (see README).
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any

import redis

from guard.errors import KeyUnavailableError

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

INVALIDATE_CHANNEL = "bg:invalidate"


class RedisKeyStore:
    """Wrapped-key persistence; every method is one round trip (or one script) to Redis."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
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
                f"key store unreachable ({type(exc).__name__}); check GUARD_REDIS_URL and that Redis runs"
            ) from None

    # --- branch and tenant keys -------------------------------------------------------------------
    def kek_versions(self, branch: str) -> tuple[int, dict[int, bytes]]:
        raw = self._call(self.client.hgetall, f"bg:kek:{branch}")
        current = int(raw.pop(b"current", b"0"))
        return current, {int(k[1:]): v for k, v in raw.items() if k.startswith(b"v")}

    def add_kek_version(self, branch: str, wrapped: bytes) -> int:
        return int(self._call(self._add_version, keys=[f"bg:kek:{branch}"], args=[wrapped]))

    def create_kek_if_absent(self, branch: str, wrapped: bytes) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(f"bg:kek:{branch}", "v1", wrapped)
        pipe.hsetnx(f"bg:kek:{branch}", "current", 1)
        self._call(pipe.execute)

    def tenant_key(self, tenant: str, purpose: str, wrapped_if_absent: bytes) -> bytes:
        name = f"bg:tkey:{tenant}:{purpose}"
        self._call(self.client.set, name, wrapped_if_absent, nx=True)
        value = self._call(self.client.get, name)
        if value is None:
            raise KeyUnavailableError(f"tenant key {purpose!r} vanished from the key store")
        return bytes(value)

    # --- data-subject keys ------------------------------------------------------------------------
    def get_or_create_dek(self, branch: str, subject: str, wrapped_if_absent: bytes) -> tuple[int, bytes] | None:
        """(version, wrapped key) of the subject's current key; None if the subject was erased."""
        version, wrapped = self._call(
            self._create_dek,
            keys=[f"bg:dek:{branch}:{subject}", f"bg:erased:{branch}:{subject}"],
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
            self._create_dek(keys=[f"bg:dek:{branch}:{subject}", f"bg:erased:{branch}:{subject}"],
                             args=[wrapped, now], client=pipe)
        results = self._call(pipe.execute)
        return [None if int(version) == -1 else (int(version), bytes(wrapped)) for version, wrapped in results]

    def dek_version(self, branch: str, subject: str, version: int) -> bytes | None:
        value = self._call(self.client.hget, f"bg:dek:{branch}:{subject}", f"v{version}")
        return None if value is None else bytes(value)

    def rotate_dek(self, branch: str, subject: str, wrapped: bytes) -> int | None:
        result = int(
            self._call(
                self._rotate_dek,
                keys=[f"bg:dek:{branch}:{subject}", f"bg:erased:{branch}:{subject}"],
                args=[wrapped],
            )
        )
        self.publish_invalidation(branch, subject)
        return None if result == -1 else result

    def shred(self, branch: str, subject: str, record: bytes) -> int:
        """Destroy every version of the subject's key; returns how many versions were destroyed."""
        destroyed = int(
            self._call(
                self._shred, keys=[f"bg:dek:{branch}:{subject}", f"bg:erased:{branch}:{subject}"], args=[record]
            )
        )
        self.publish_invalidation(branch, subject)
        return destroyed

    def erased_record(self, branch: str, subject: str) -> bytes | None:
        value = self._call(self.client.get, f"bg:erased:{branch}:{subject}")
        return None if value is None else bytes(value)

    def compact(self) -> None:
        """Ask Redis to rewrite its append-only file so destroyed keys leave the disk too."""
        # A rewrite already in progress answers with an error; it won't contain the destroyed key either.
        with contextlib.suppress(redis.ResponseError):
            self.client.bgrewriteaof()

    # --- legal hold -------------------------------------------------------------------------------
    def set_hold(self, branch: str, subject: str, held: bool) -> None:
        fn = self.client.sadd if held else self.client.srem
        self._call(fn, f"bg:hold:{branch}", subject)

    def is_held(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.sismember, f"bg:hold:{branch}", subject))

    def set_storage_only(self, branch: str, subject: str, confirmation_id: str) -> None:
        self._call(self.client.set, f"bg:storage-only:{branch}:{subject}", confirmation_id)

    def is_storage_only(self, branch: str, subject: str) -> bool:
        return bool(self._call(self.client.exists, f"bg:storage-only:{branch}:{subject}"))

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
            pipe.sadd(f"bg:topics:{branch}:{subject}", topic)
            pipe.zadd(f"bg:expiry:{branch}", {subject: now + retention_s}, gt=True)
        self._call(pipe.execute)

    def expired_subjects(self, branch: str, now: float, limit: int = 1000) -> list[str]:
        """Subjects whose retention ran out by `now` (oldest first)."""
        found = self._call(self.client.zrangebyscore, f"bg:expiry:{branch}", "-inf", now, start=0, num=limit)
        return [m.decode() for m in found]

    def forget_expiry(self, branch: str, subject: str) -> None:
        self._call(self.client.zrem, f"bg:expiry:{branch}", subject)

    def subject_topics(self, branch: str, subject: str) -> set[str]:
        return {m.decode() for m in self._call(self.client.smembers, f"bg:topics:{branch}:{subject}")}

    # --- a subject's records on compacted sanitized topics (erasure writes tombstones for them) --------
    def record_compacted_key(self, branch: str, subject: str, topic: str, partition: int, key: bytes) -> None:
        """Remember that `subject`'s latest record under `key` sits on compacted `topic`, `partition`.

        Two maps, one round trip: the subject's (topic, partition, key) set, and per topic which subject
        each key's latest record belongs to (a row that moved to another customer is no longer the
        erased customer's to tombstone). Keys are sanitized Kafka keys (tokens), never plaintext.
        """
        member = _compacted_member(topic, partition, key)
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(f"bg:ckeys:{branch}:{subject}", member)
        pipe.hset(f"bg:ckey-owner:{branch}", member, subject)
        self._call(pipe.execute)

    def compacted_keys(self, branch: str, subject: str) -> list[tuple[str, int, bytes]]:
        """(topic, partition, key) of the subject's latest records on compacted topics (still its own)."""
        members = sorted(self._call(self.client.smembers, f"bg:ckeys:{branch}:{subject}"))
        if not members:
            return []
        owners = self._call(self.client.hmget, f"bg:ckey-owner:{branch}", members)
        out = []
        for member, owner in zip(members, owners, strict=True):
            if owner is not None and owner.decode() == subject:
                topic, partition, key = _parse_compacted_member(bytes(member))
                out.append((topic, partition, key))
        return out

    def alert_once(self, key: str, ttl_s: int = 86_400) -> bool:
        """True for the first caller across all workers within `ttl_s` (alert deduplication)."""
        return bool(self._call(self.client.set, f"bg:alerted:{key}", 1, nx=True, ex=ttl_s))

    # --- cache invalidation -----------------------------------------------------------------------
    def publish_invalidation(self, branch: str, subject: str) -> None:
        self._call(self.client.publish, INVALIDATE_CHANNEL, f"{branch}:{subject}")


def _compacted_member(topic: str, partition: int, key: bytes) -> bytes:
    t = topic.encode()
    return struct.pack(">II", len(t), partition) + t + key


def _parse_compacted_member(member: bytes) -> tuple[str, int, bytes]:
    length, partition = struct.unpack_from(">II", member)
    return member[8:8 + length].decode(), partition, member[8 + length:]
