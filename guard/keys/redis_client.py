"""A Redis client of the key store: TLS pinned to the URL's CA, the password read from its 0600 file."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from guard.config import read_secret_file
from guard.keys.redis_tls import PinnedSSLConnection


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
    TLS (`rediss://`) trusts the URL's `ssl_ca_certs` only, with one context per process (`redis_tls`).
    """
    from guard.config import Settings

    parts = urlsplit(url)
    if parts.scheme == "rediss":
        kwargs.setdefault("connection_class", PinnedSSLConnection)
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
