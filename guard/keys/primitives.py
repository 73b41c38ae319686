"""Low-level cryptographic primitives, one per job, over `cryptography`'s vetted implementations.

Nothing here chooses keys or knows about subjects or branches; `guard.keys.manager` does. Each class
holds its key privately, has no method that returns it, and has a `__repr__` that never shows it.

Sealed-value layout (`Aead.seal`), all integers big-endian:

    +---------+-------------------+-------------+------------------------------+
    | 0x01    | key version (u32) | nonce (12B) | AES-256-GCM ciphertext + tag |
    +---------+-------------------+-------------+------------------------------+

The first byte is the format version, so the layout can change without guessing. The key version tells
the reader which version of the data key to fetch. The associated data is never stored: the reader
rebuilds it from where the ciphertext sits (topic, table, row key, image, field names, key version), so a
ciphertext copied anywhere else fails to authenticate.

Wrapped-key layout (`KeyWrapper.wrap`) is the same shape with the wrapping key's version in the header.

The compiled hot path seals in Rust: each `Aead` holds `sealing_key`, the key inside the extension
(`guard_native.SealingKey`: OpenSSL's AES-256-GCM, the primitive `cryptography` calls, and OpenSSL's
CSPRNG for nonces), which writes exactly this layout and never gives its key back (no method returns it,
its repr hides it, pickling is refused); `Aead.seal` and `open` use it too. Without the extension
`sealing_key` is None, `cryptography`'s AESGCM does the work, and only the Python path runs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guard.errors import IntegrityError

try:  # pragma: no cover - depends on whether the compiled hot path was built (native/, scripts/build-native.sh)
    from guard_native import SealingKey as _SealingKey
    from guard_native import TokenKey as _TokenKey
except ImportError:  # pragma: no cover
    _SealingKey = _TokenKey = None

FORMAT_V1 = 1
_HEADER = struct.Struct(">BI")
NONCE_BYTES = 12
KEY_BYTES = 32
HEADER_BYTES = _HEADER.size + NONCE_BYTES
#: The associated data of a wrapped key starts with this; the wrapped key's name follows (`KeyWrapper`).
_WRAP_AAD = b"bg/wrap/v1|"


def random_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


class Aead:
    """AES-256-GCM with a random 96-bit nonce per message and a versioned header.

    Random nonces are safe for up to 2^32 messages per key (NIST SP 800-38D); a data key per data subject
    keeps every key far below that.

    `sealing_key`: the same key inside the compiled extension (`guard_native.SealingKey`), which the
    native run seals with, no Python call per image; None without the extension. With the extension the
    key is held there only: `seal` and `open` call it too, and no `cryptography` AESGCM object is built
    next to it (a data key loaded on a cache miss paid for both, and its key sat in two places). Without
    the extension `cryptography`'s AESGCM does the job: OpenSSL's AES-256-GCM either way. Both write the
    layout above, and each opens what the other sealed.
    """

    __slots__ = ("_aead", "_header", "sealing_key", "version")

    def __init__(self, key: bytes, version: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self.sealing_key = _SealingKey(key, version) if _SealingKey is not None else None
        self._aead = AESGCM(key) if self.sealing_key is None else None
        self._header = _HEADER.pack(FORMAT_V1, version)  # sealed once per event: packed once per key
        self.version = version

    @classmethod
    def _of_sealing_key(cls, sealing_key: object) -> Aead:
        """An `Aead` around a key that exists only inside the extension (`KeyWrapper.unwrap_aeads`)."""
        aead = cls.__new__(cls)
        aead.sealing_key = sealing_key
        aead._aead = None
        aead.version = sealing_key.version  # type: ignore[attr-defined]
        aead._header = _HEADER.pack(FORMAT_V1, aead.version)
        return aead

    def cache_entry(self) -> object:
        """What a key cache keeps of this key: its `SealingKey` when the extension holds it, else itself
        (`of_cache_entry` gives the `Aead` back).

        Why: an `Aead` is a Python object the cyclic garbage collector tracks, and so is the (key, expiry)
        tuple holding it; a worker caching a hundred thousand keys had every full collection walk them all,
        pauses of 40-120 ms inside a batch (docs/benchmark.md, round 19). A `SealingKey` is an extension
        object the collector doesn't track, and a tuple of it and a float is untracked at its first
        collection.
        """
        return self.sealing_key if self.sealing_key is not None else self

    @classmethod
    def of_cache_entry(cls, entry: object) -> Aead:
        """The `Aead` of what `cache_entry` returned (the same key; a new wrapper around a `SealingKey`)."""
        return entry if isinstance(entry, Aead) else cls._of_sealing_key(entry)

    def __repr__(self) -> str:
        return f"Aead(version={self.version}, key=<hidden>)"

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        if self._aead is None:
            return self.sealing_key.seal(plaintext, associated_data)  # type: ignore[union-attr]
        nonce = os.urandom(NONCE_BYTES)
        return b"".join((self._header, nonce, self._aead.encrypt(nonce, plaintext, associated_data)))

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        fmt, version = sealed_header(sealed)
        if version != self.version:
            raise IntegrityError(f"ciphertext is for key version {version}, this key is version {self.version}")
        if self._aead is None:
            try:
                return self.sealing_key.open(sealed, associated_data)  # type: ignore[union-attr]
            except ValueError as exc:  # the same messages as below, never key material
                raise IntegrityError(str(exc)) from None
        nonce = sealed[_HEADER.size:HEADER_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[HEADER_BYTES:], associated_data)
        except InvalidTag:
            raise IntegrityError(
                "ciphertext failed authentication: it was altered, moved to another field, row or topic, "
                "or sealed under another key"
            ) from None


def sealed_header(sealed: bytes) -> tuple[int, int]:
    """Return (format version, key version) of a sealed value, validating its framing."""
    if len(sealed) < HEADER_BYTES + 16:
        raise IntegrityError("ciphertext too short to be a sealed value")
    fmt, version = _HEADER.unpack_from(sealed)
    if fmt != FORMAT_V1:
        raise IntegrityError(f"unknown ciphertext format {fmt}")
    return fmt, version


class KeyWrapper(Aead):
    """AES-256-GCM used to wrap (encrypt) other keys; the associated data names the wrapped key."""

    def wrap(self, key: bytes, key_name: str) -> bytes:
        return self.seal(key, _WRAP_AAD + key_name.encode())

    def unwrap(self, wrapped: bytes, key_name: str) -> bytes:
        return self.open(wrapped, _WRAP_AAD + key_name.encode())

    def unwrap_aeads(self, items: list[tuple[bytes, str, int]]) -> list[Aead]:
        """The data keys `items` (wrapped key, its name, its version) wrapped under this key, as `Aead`s.

        With the extension the keys are unwrapped into `guard_native.SealingKey`s in one call and their
        bytes never become Python objects (a batch's key-cache misses: `KeyManager.prefetch`); without it,
        one `unwrap` each. IntegrityError if any wrapping does not open under this key."""
        if self.sealing_key is None:
            return [Aead(self.unwrap(wrapped, name), version) for wrapped, name, version in items]
        try:
            keys = self.sealing_key.unwrap_keys([wrapped for wrapped, _, _ in items],
                                                [_WRAP_AAD + name.encode() for _, name, _ in items],
                                                [version for _, _, version in items])
        except ValueError as exc:  # the position and what failed, never key material
            raise IntegrityError(str(exc)) from None
        return [Aead._of_sealing_key(key) for key in keys]

    def mint_aeads(self, key_names: list[str], version: int) -> list[tuple[bytes, Aead]]:
        """New data keys of `version`, one per name: (the key wrapped under this key, the key as an `Aead`).

        With the extension each key is drawn, wrapped and held inside it (`SealingKey.mint_keys`) and its
        bytes never become a Python object, as `unwrap_aeads` does for loaded keys; without it, `random_key`
        and `wrap` per key."""
        if self.sealing_key is None:
            fresh = [random_key() for _ in key_names]
            return [(self.wrap(key, name), Aead(key, version)) for key, name in zip(fresh, key_names, strict=True)]
        wrapped, keys = self.sealing_key.mint_keys([_WRAP_AAD + name.encode() for name in key_names], version)
        return [(w, Aead._of_sealing_key(k)) for w, k in zip(wrapped, keys, strict=True)]

    def mint_wrapped(self, key_name: str) -> bytes:
        """A new data key wrapped under this key, the key itself kept by nobody (a rotation stores the
        wrapping; the next use loads and unwraps it), minted as `mint_aeads` mints."""
        return self.mint_aeads([key_name], 0)[0][0]


class BlindIndex:
    """Deterministic keyed token (keyed BLAKE2b, 128 bits, 32 hex digits) for joins and equality search.

    Equal inputs give equal tokens under the same key, which is the point; without the key a token can't
    be computed, so low-entropy values (mobiles, 6-digit PINs) can't be found by brute force, unlike a
    plain or statically salted hash (Debezium's column hashing). BLAKE2b's keyed mode (RFC 7693) is a
    PRF like HMAC-SHA256 and a third of its cost here; it runs for every indexed field of every event.

    `token_key`: the same key inside the compiled extension (`guard_native.TokenKey`, RustCrypto's
    BLAKE2b: the same tokens), with which native runs tokenise Kafka keys; None without the extension.
    """

    __slots__ = ("_key", "token_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.token_key = _TokenKey(key) if _TokenKey is not None else None

    def __repr__(self) -> str:
        return "BlindIndex(key=<hidden>)"

    def token(self, value: bytes) -> str:
        return hashlib.blake2b(value, key=self._key, digest_size=16).hexdigest()


class KeyedHash:
    """Keyed one-way hash (keyed BLAKE2b, 256 bits) for C3 authentication data that must not be carried.

    The secret key is the salt: a leaked hash of a 6-digit PIN can't be reversed offline without it.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "KeyedHash(key=<hidden>)"

    def digest(self, domain: str, value: bytes) -> str:
        mac = hashlib.blake2b(domain.encode() + b"\x00" + value, key=self._key, digest_size=32).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class Hmac:
    """HMAC-SHA256 (`cryptography`) under a key of the guard's: fingerprints that only the guard can recompute.

    For the DLQ: two failed inputs can be compared ("is this the same record again?") without a hash that
    anyone could confirm a guessed plaintext against, as they could with a plain SHA-256.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Hmac(key=<hidden>)"

    def hexdigest(self, domain: str, value: bytes) -> str:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        mac.update(domain.encode() + b"\x00" + value)
        return mac.finalize().hex()
