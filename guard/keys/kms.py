"""The KMS interface and the embedded local keyring.

A KMS holds the master key and only ever wraps and unwraps branch and tenant keys; data never goes to
it, so it is called a handful of times per worker start, never per event. Production deployments plug a
cloud KMS or an HSM in behind the same two methods.

The local keyring reads a 256-bit master key from `GUARD_MASTER_KEY` (base64) or from a key file
(`GUARD_MASTER_KEY_FILE`, default `~/.config/branchguard/master.key`, created with mode 0600 on first use
when `create=True`). The key is never logged, printed or put in an error.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Protocol

from guard.errors import ConfigError, KeyUnavailableError
from guard.keys.primitives import KEY_BYTES, KeyWrapper, random_key
from guard.secretfile import create_private, read_private_text

DEFAULT_KEY_FILE = Path.home() / ".config" / "branchguard" / "master.key"


class Kms(Protocol):
    """What the guard needs from a key management service."""

    key_id: str

    def wrap(self, key: bytes, key_name: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, key_name: str) -> bytes: ...


class LocalKeyring:
    """A master key held in this process, loaded from the environment or a 0600 file."""

    def __init__(self, master_key: bytes, key_id: str = "local") -> None:
        if len(master_key) != KEY_BYTES:
            raise ConfigError("the master key must be 32 bytes (base64 of 32 random bytes)")
        self._wrapper = KeyWrapper(master_key, version=1)
        self.key_id = key_id

    def __repr__(self) -> str:
        return f"LocalKeyring(key_id={self.key_id!r}, key=<hidden>)"

    @classmethod
    def from_environment(cls, *, create: bool = False) -> LocalKeyring:
        encoded = os.environ.get("GUARD_MASTER_KEY")
        if encoded:
            return cls(_decode_key(encoded, "GUARD_MASTER_KEY"), key_id="env")
        path = Path(os.environ.get("GUARD_MASTER_KEY_FILE") or DEFAULT_KEY_FILE)
        if not path.exists():
            if not create:
                raise KeyUnavailableError(
                    f"no master key: set GUARD_MASTER_KEY or create {path} "
                    "(`guard keys init` writes a new one with mode 0600)"
                )
            create_private(path, base64.b64encode(random_key()) + b"\n")
        return cls(_decode_key(read_private_text(path, "master key file", ConfigError), str(path)),
                   key_id=f"file:{path}")

    def wrap(self, key: bytes, key_name: str) -> bytes:
        return self._wrapper.wrap(key, key_name)

    def unwrap(self, wrapped: bytes, key_name: str) -> bytes:
        return self._wrapper.unwrap(wrapped, key_name)


def _decode_key(encoded: str, where: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"the master key in {where} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the master key in {where} must decode to 32 bytes")
    return key
