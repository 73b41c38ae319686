"""Bearer tokens of the reveal service, stored only as keyed hashes.

A token is `bgr_<id>_<secret>`: `id` (8 hex digits) names it in listings and audit-free management
(`guard reveal token list/revoke`), `secret` is 32 random bytes (base64url). The key store keeps only
HMAC-SHA256(server key, token) → (principal, id, created, expires) in one Redis hash (`bg:{tenant}:reveal:tokens`).
The server key is 32 random bytes in a 0600 file (`reveal_token_key_file`) that Redis never sees, so:

- a copy of Redis (or of its append-only file, or a backup) gives no usable token: the hashes can't be
  reversed, and without the server key they can't be recomputed from a guessed token either;
- someone who can write Redis can't mint a token: a hash they add matches no token they know, unless they
  also hold the server key;
- nor can they re-target an existing token: each entry is stored with HMAC-SHA256(server key, domain,
  hash name, field, entry) in front of it (`hmac-sha256:<hex>:<entry JSON>`), so rewriting its principal
  or expiry, moving it to another field or another tenant's hash, or dropping the MAC makes it no token
  at all (fail closed). Entries written before the MAC existed stop working the same way: `token list`
  shows them as not authenticated, and they are re-created with `guard reveal token create`.

What a writer of Redis can still do: delete entries (every token stops working) and put back an entry
it copied earlier, such as a revoked token's (revocation is a deletion; it holds as long as Redis does).

The token itself is printed once, by `guard reveal token create`, and never stored, logged or audited.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import redis

from guard.errors import ConfigError, KeyUnavailableError
from guard.keys.store import RedisKeyStore
from guard.secretfile import create_private, read_private_text

DEFAULT_TOKEN_KEY_FILE = Path.home() / ".config" / "branchguard" / "reveal-token.key"
TOKEN_PREFIX = "bgr_"  # noqa: S105 - the token format's prefix, not a secret
#: Principal names: a Cedar entity reference `Kind::id` (`Staff::m0101`, `Service::crm`), as audit records carry it.
PRINCIPAL_RE = re.compile(r"^[A-Z][A-Za-z]{0,31}::[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN_RE = re.compile(r"^bgr_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")
#: The stored entry's framing: `hmac-sha256:<64 hex digits>:<entry JSON>`.
_ENTRY_PREFIX = b"hmac-sha256:"
#: What an entry's MAC is computed over starts with this; a field hash is computed over a token (`bgr_…`), so
#: no MAC input is ever a field hash's input under the same key (domain separation).
_ENTRY_DOMAIN = b"branchguard/reveal/token-entry/v1\x00"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the key store knows about a token: never the token, never its hash."""

    id: str
    principal: str
    created_ms: int
    expires_ms: int | None
    #: False for an entry whose MAC is missing or wrong (written before entries had one, or altered in
    #: Redis): it authenticates nothing, `list` shows it so it can be revoked and re-created.
    authentic: bool = True

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and now_ms >= self.expires_ms


def load_token_key(path: str | os.PathLike[str] | None = None, *, create: bool = False) -> bytes:
    """The server key of token hashes from its 0600 file (created with 32 random bytes when `create`)."""
    file = Path(path) if path else DEFAULT_TOKEN_KEY_FILE
    if not file.exists():
        if not create:
            raise ConfigError(f"no reveal token key at {file}: `guard reveal token create` writes one (mode 0600)")
        create_private(file, base64.b64encode(secrets.token_bytes(32)) + b"\n")  # False: another process won
    try:
        key = base64.b64decode(read_private_text(file, "reveal token key file", ConfigError), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"reveal token key file {file} is not base64") from None
    if len(key) != 32:
        raise ConfigError(f"reveal token key file {file} must hold 32 bytes (base64)")
    return key


class TokenStore:
    """Creates, checks, lists and revokes reveal tokens; holds the server key, hands out no hash."""

    def __init__(self, store: RedisKeyStore, key: bytes) -> None:
        self._client = store.client
        self._name = store.name("reveal", "tokens")
        self._key = key

    def __repr__(self) -> str:
        return "TokenStore(<key hidden>)"

    def _hash(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def _mac(self, field: bytes, entry: bytes) -> bytes:
        """The entry's MAC, bound to this hash's Redis name (the tenant) and to the field it is stored under,
        so an entry is only valid as written, where it was written (length-prefixed: no two inputs collide)."""
        msg = b"".join(len(part).to_bytes(4, "big") + part for part in (self._name.encode(), field))
        return hmac.new(self._key, _ENTRY_DOMAIN + msg + entry, hashlib.sha256).hexdigest().encode()

    def _seal(self, field: str, entry: bytes) -> bytes:
        """The stored form of an entry: its MAC, then the entry's JSON as it was MACed."""
        return _ENTRY_PREFIX + self._mac(field.encode(), entry) + b":" + entry

    def _open(self, field: str | bytes, raw: str | bytes) -> TokenInfo | None:
        """The stored entry, `authentic` only when its MAC verifies; None when it isn't an entry at all."""
        field = field.encode() if isinstance(field, str) else field
        raw = raw.encode() if isinstance(raw, str) else raw
        mac, entry, authentic = b"", raw, False
        if raw.startswith(_ENTRY_PREFIX):
            mac, _, entry = raw[len(_ENTRY_PREFIX):].partition(b":")
            authentic = hmac.compare_digest(mac, self._mac(field, entry))
        try:
            info = _info(entry)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return info if authentic else replace(info, authentic=False)

    def create(self, principal: str, *, ttl_s: int | None = None, now_ms: int | None = None) -> tuple[str, TokenInfo]:
        """A new token for `principal` (returned once) and what is stored about it."""
        if not PRINCIPAL_RE.match(principal):
            raise ConfigError("a principal is Kind::id, e.g. Staff::m0101 or Service::crm (an id of 1-64 letters, "
                              "digits and . _ @ -): the policy's entity it is decided as")
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        token_id = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        info = TokenInfo(token_id, principal, now_ms, None if ttl_s is None else now_ms + ttl_s * 1000)
        entry = orjson.dumps({"id": info.id, "principal": principal, "created_ms": info.created_ms,
                              "expires_ms": info.expires_ms})
        field = self._hash(token)
        self._call(self._client.hset, self._name, field, self._seal(field, entry))
        return token, info

    def verify(self, token: str, *, now_ms: int | None = None) -> TokenInfo | None:
        """The token's entry if it is one of ours, authentic and not expired; None otherwise (never says why)."""
        if not _TOKEN_RE.match(token):
            return None
        field = self._hash(token)
        raw = self._call(self._client.hget, self._name, field)
        info = None if raw is None else self._open(field, raw)
        if info is None or not info.authentic:
            return None  # an altered, moved or pre-MAC entry is no token: fail closed
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return None if info.expired(now_ms) else info

    def list(self) -> list[TokenInfo]:
        """Every stored token's entry (id, principal, dates, whether it is authentic), oldest first."""
        return sorted((info for _, info in self._entries()), key=lambda i: (i.created_ms, i.id))

    def _entries(self) -> Sequence[tuple[Any, TokenInfo]]:
        """(field, entry) of every stored entry, authentic or not (so either can be listed and revoked)."""
        found = [(h, self._open(h, v)) for h, v in self._call(lambda: list(self._client.hscan_iter(self._name)))]
        return [(h, info) for h, info in found if info is not None]

    def revoke(self, *, token_id: str | None = None, principal: str | None = None) -> int:
        """Delete the tokens with this id or of this principal; returns how many were deleted."""
        if not token_id and not principal:
            raise ConfigError("say which tokens to revoke: --id or --principal")
        doomed = [h for h, info in self._entries()
                  if (token_id and info.id == token_id) or (principal and info.principal == principal)]
        if not doomed:
            return 0
        return int(self._call(self._client.hdel, self._name, *doomed))

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise KeyUnavailableError(f"key store unreachable ({type(exc).__name__}): reveal tokens can't be "
                                      "checked") from None


def _info(raw: bytes) -> TokenInfo:
    """An entry's JSON as a TokenInfo (raises on anything else)."""
    doc = orjson.loads(raw)
    return TokenInfo(str(doc["id"]), str(doc["principal"]), int(doc["created_ms"]),
                     None if doc.get("expires_ms") is None else int(doc["expires_ms"]))
