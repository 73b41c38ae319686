"""Exception hierarchy.

Every error a user can meet says what went wrong and what to do about it. None of them ever carries a
plaintext field value or key material: messages name tables, columns, topics and offsets, never data.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class for BranchGuard errors."""


class ConfigError(GuardError):
    """The configuration is missing or invalid; the message names the setting and how to fix it."""


class DecodeError(GuardError):
    """A change event could not be decoded. `reason` is a short machine-friendly code for the DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class KeyUnavailableError(GuardError):
    """A key could not be obtained (key store unreachable, key shredded, master key missing).

    The guard fails closed on this error: the event goes to the DLQ, never out in plaintext.
    """


class KeyShreddedError(KeyUnavailableError):
    """The data subject's key was destroyed (crypto-shredded); its ciphertexts are unreadable by design."""


class SubjectRestrictedError(GuardError):
    """The data subject is under legal hold or storage-only: its data is kept sealed, not revealed."""


class TenantKeyMissingError(GuardError):
    """A tenant key is gone from the key store although the tenant has data there: the guard stops.

    Not a `KeyUnavailableError` on purpose: that one pauses and retries, this one needs an operator.
    """

    def __init__(self, tenant: str, purposes: list[str]) -> None:
        super().__init__(
            f"tenant {tenant!r} has key-store data but its tenant key(s) {', '.join(purposes)} are missing "
            "from Redis; the guard refuses to mint new ones (blind indexes, keyed hashes and quarantined "
            "records would stop matching and erasures would report keys that never existed). Restore the "
            "key(s) from the Redis backup (AOF) of the key store, then start the workers again; see "
            "docs/keys.md, 'Missing tenant key'.")
        self.tenant = tenant
        self.purposes = purposes


class IntegrityError(GuardError):
    """A ciphertext failed authentication: tampered with, moved to another field/row/topic, or wrong key."""
