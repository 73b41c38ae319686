"""Reveal tokens' stored entries are authenticated: write access to Redis can't re-target a token.

Only the field of a token's entry used to be keyed (HMAC of the token); its JSON (principal, expiry) was
not, so whoever could write Redis could give an existing token another principal, lift its expiry, or put a
powerful principal's entry under their own token's field, although docs/reveal.md says write access to
Redis can't mint a token. The Redis here is a dict: these tests are about what `TokenStore` accepts.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from guard.reveal.tokens import TokenStore

KEY = bytes(range(32))
NOW_MS = 1_700_000_000_000


class FakeRedis:
    """The hash commands `TokenStore` uses, over dicts of bytes (as redis-py answers without decode_responses)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    @staticmethod
    def _b(value: str | bytes) -> bytes:
        return value.encode() if isinstance(value, str) else value

    def hset(self, name: str, key: str | bytes, value: str | bytes) -> int:
        self.hashes.setdefault(name, {})[self._b(key)] = self._b(value)
        return 1

    def hget(self, name: str, key: str | bytes) -> bytes | None:
        return self.hashes.get(name, {}).get(self._b(key))

    def hscan_iter(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.hashes.get(name, {}).items()))

    def hdel(self, name: str, *keys: str | bytes) -> int:
        found = self.hashes.get(name, {})
        return sum(found.pop(self._b(k), None) is not None for k in keys)


class FakeStore:
    """What `TokenStore` takes of a `RedisKeyStore`: its client and its tenant's key names."""

    def __init__(self, client: FakeRedis, tenant: str = "t1") -> None:
        self.client = client
        self.tenant = tenant

    def name(self, *parts: str) -> str:
        return ":".join(("bg", self.tenant, *parts))


HASH = "bg:t1:reveal:tokens"


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


def _tokens(redis: FakeRedis, tenant: str = "t1") -> TokenStore:
    return TokenStore(FakeStore(redis, tenant), KEY)  # type: ignore[arg-type]


def _field_of(redis: FakeRedis, principal: str) -> bytes:
    [field] = [k for k, v in redis.hashes[HASH].items() if principal.encode() in v]
    return field


def _rewrite(redis: FakeRedis, field: bytes, old: bytes, new: bytes) -> None:
    """Edit an entry in place as someone with write access to Redis would, leaving everything else as it is."""
    value = redis.hashes[HASH][field]
    assert old in value
    redis.hashes[HASH][field] = value.replace(old, new)


def test_a_rewritten_principal_makes_the_token_no_token(redis: FakeRedis) -> None:
    store = _tokens(redis)
    token, info = store.create("Staff::t0101", now_ms=NOW_MS)
    assert store.verify(token, now_ms=NOW_MS) == info  # as created, it verifies
    assert token.encode() not in b"".join(k + v for k, v in redis.hashes[HASH].items())
    _rewrite(redis, _field_of(redis, "Staff::t0101"), b'"Staff::t0101"', b'"Staff::c0101"')
    assert store.verify(token, now_ms=NOW_MS) is None


def test_a_removed_expiry_makes_the_token_no_token(redis: FakeRedis) -> None:
    store = _tokens(redis)
    token, info = store.create("Staff::t0101", ttl_s=60, now_ms=NOW_MS)
    assert store.verify(token, now_ms=NOW_MS + 59_999) == info and store.verify(token, now_ms=NOW_MS + 60_000) is None
    _rewrite(redis, _field_of(redis, "Staff::t0101"), f'"expires_ms":{info.expires_ms}'.encode(),
             b'"expires_ms":null')
    assert store.verify(token, now_ms=NOW_MS + 120_000) is None
    _rewrite(redis, _field_of(redis, "Staff::t0101"), b'"expires_ms":null', b'"expires_ms":99999999999999')
    assert store.verify(token, now_ms=NOW_MS + 120_000) is None


def test_another_tokens_entry_under_ones_own_field_is_no_token(redis: FakeRedis) -> None:
    """The MAC binds the field: a teller can't copy compliance's entry (MAC and all) under their own token."""
    store = _tokens(redis)
    teller, _ = store.create("Staff::t0101", now_ms=NOW_MS)
    store.create("Staff::c0101", now_ms=NOW_MS)
    redis.hashes[HASH][_field_of(redis, "Staff::t0101")] = redis.hashes[HASH][_field_of(redis, "Staff::c0101")]
    assert store.verify(teller, now_ms=NOW_MS) is None


def test_an_entry_copied_to_another_tenants_hash_is_no_token(redis: FakeRedis) -> None:
    """The MAC binds the hash's name: one server key file serving two tenants doesn't let an entry move."""
    token, _ = _tokens(redis, "t1").create("Staff::t0101", now_ms=NOW_MS)
    redis.hashes["bg:t2:reveal:tokens"] = dict(redis.hashes[HASH])
    assert _tokens(redis, "t2").verify(token, now_ms=NOW_MS) is None
    assert _tokens(redis, "t1").verify(token, now_ms=NOW_MS) is not None


def test_an_entry_without_a_mac_is_refused_but_listed_and_revocable(redis: FakeRedis) -> None:
    """An entry as written before entries were authenticated (its JSON alone) fails closed; `token list` shows
    it as not authenticated and `token revoke` deletes it, so the operator can re-create it."""
    store = _tokens(redis)
    token, info = store.create("Staff::t0101", now_ms=NOW_MS)
    field = _field_of(redis, "Staff::t0101")
    redis.hashes[HASH][field] = orjson.dumps({"id": info.id, "principal": info.principal,
                                              "created_ms": info.created_ms, "expires_ms": None})
    assert store.verify(token, now_ms=NOW_MS) is None
    other, _ = store.create("Service::crm", now_ms=NOW_MS + 1)
    listed = store.list()
    assert [(i.principal, i.authentic) for i in listed] == [("Staff::t0101", False), ("Service::crm", True)]
    assert store.revoke(token_id=info.id) == 1 and field not in redis.hashes[HASH]
    assert store.revoke(principal="Service::crm") == 1 and store.verify(other, now_ms=NOW_MS) is None


def test_garbage_in_the_hash_is_no_token_and_does_not_break_listing(redis: FakeRedis) -> None:
    store = _tokens(redis)
    token, _ = store.create("Staff::t0101", now_ms=NOW_MS)
    field = _field_of(redis, "Staff::t0101")
    value = redis.hashes[HASH][field]
    redis.hashes[HASH][field] = value[: value.index(b"{")] + b"not json"  # its MAC, if any, kept
    redis.hashes[HASH][b"\xff\xfe"] = b"[1, 2]"
    assert store.verify(token, now_ms=NOW_MS) is None
    assert store.list() == []


def test_token_list_flags_entries_without_a_valid_mac_and_says_what_to_do(redis: FakeRedis,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from guard.cli.main import main
    from guard.reveal import server

    store = _tokens(redis)
    store.create("Service::crm", now_ms=NOW_MS)
    _, old = store.create("Staff::t0101", now_ms=NOW_MS + 1)
    _rewrite(redis, _field_of(redis, "Staff::t0101"), b'"Staff::t0101"', b'"Staff::c0101"')
    monkeypatch.setattr(server, "token_store", lambda *_a, **_k: store)
    result = CliRunner().invoke(main, ["reveal", "token", "list"])
    assert result.exit_code == 0, result.output
    good, bad = [ln for ln in result.output.splitlines() if "  created " in ln]  # oldest first
    assert "Service::crm" in good and "NOT AUTHENTICATED" not in good
    assert bad.startswith(old.id) and "NOT AUTHENTICATED" in bad
    assert "guard reveal token create" in result.output and "revoke" in result.output
