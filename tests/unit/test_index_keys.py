"""Blind-index keys (finding 1): one key per (tenant, field, purpose), derived with HKDF from the tenant's
index root key; subject tokens of (branch, id) (finding 10); the reveal side holds no index key.

The key store here is a stand-in for Redis's create-if-absent of tenant keys (pure logic: the derivation
and the tokens); the integration tests run the same code against the real key store.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guard.errors import KeyUnavailableError
from guard.keys.kms import LocalKeyring
from guard.keys.manager import KeyManager
from guard.keys.primitives import BlindIndex, random_key


class _TenantKeys:
    """Create-if-absent of wrapped tenant keys, all together, as `RedisKeyStore.tenant_keys` does (one store
    per tenant: the real store's names carry the tenant prefix)."""

    def __init__(self, tenant: str = "bank-a") -> None:
        self.tenant = tenant
        self.keys: dict[tuple[str, str], bytes] = {}

    def tenant_keys(self, wrapped_if_absent: dict[str, bytes]) -> dict[str, bytes]:
        return {p: self.keys.setdefault((self.tenant, p), w) for p, w in wrapped_if_absent.items()}

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        return [p for p in purposes if (self.tenant, p) not in self.keys]


class _RecordingKeyring(LocalKeyring):
    """The local keyring, remembering the name of every key it unwraps."""

    unwrapped: list[str]

    def unwrap(self, wrapped: bytes, key_name: str) -> bytes:
        self.unwrapped = [*getattr(self, "unwrapped", []), key_name]
        return super().unwrap(wrapped, key_name)


@pytest.fixture()
def master():
    return LocalKeyring(random_key())


def _manager(master, store, tenant="bank-a", **kw) -> KeyManager:
    return KeyManager(master, store, tenant, listen=False, **kw)  # type: ignore[arg-type]


def test_each_field_and_purpose_has_its_own_key(master):
    keys = _manager(master, _TenantKeys())
    mobile = b"13812345678"
    tokens = {keys.search_token("mobile", mobile), keys.search_token("id_number", mobile),
              keys.key_token("mobile", mobile), keys.index_for("mobile", "other").token(mobile)}
    assert len(tokens) == 4
    assert keys.search_token("mobile", mobile) == keys.search_token("mobile", mobile)  # deterministic: joins


def test_the_derivation_is_hkdf_of_the_root_with_tenant_field_and_purpose(master):
    store = _TenantKeys()
    keys = _manager(master, store)
    root = master.unwrap(store.keys[("bank-a", "index")], "tenant/bank-a/index")
    info = b"bg/index/v1" + b"".join(struct.pack(">I", len(p)) + p for p in (b"bank-a", b"mobile", b"search"))
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)
    assert keys.search_token("mobile", b"13812345678") == BlindIndex(derived).token(b"13812345678")
    # the root itself keys nothing: a token under the root is not any field's token
    assert BlindIndex(root).token(b"13812345678") != keys.search_token("mobile", b"13812345678")


def test_tenants_get_different_keys_for_the_same_field(master):
    a, b = _manager(master, _TenantKeys("bank-a"), "bank-a"), _manager(master, _TenantKeys("bank-b"), "bank-b")
    assert a.search_token("mobile", b"13812345678") != b.search_token("mobile", b"13812345678")


def test_subject_tokens_name_one_person_per_branch(master):
    keys = _manager(master, _TenantKeys())
    assert keys.subject_token("0101", 17) != keys.subject_token("0202", 17)
    assert keys.subject_token("0101", 17) == keys.subject_token("0101", "17")  # stable within a branch
    # length prefixes: branch "01" + id "017" is not branch "010" + id "17"
    assert keys.subject_token("01", "017") != keys.subject_token("010", "17")
    # a subject token is not a search token of the same bytes, nor a row's token
    assert keys.subject_token("0101", 17) != keys.row_subject_token("0101", "public.t", b"17")


def test_the_reveal_side_never_loads_or_derives_an_index_key():
    master = _RecordingKeyring(random_key())
    store = _TenantKeys()
    reveal = _manager(master, store, indexes=False)
    assert ("bank-a", "index") in store.keys  # minted with the others (fail closed: all or none) ...
    assert "tenant/bank-a/index" not in master.unwrapped  # ... but never unwrapped on the reveal side
    assert reveal._index_root is None
    with pytest.raises(KeyUnavailableError, match="stay inside the sanitizer"):
        reveal.search_token("mobile", b"13812345678")
    with pytest.raises(KeyUnavailableError):
        reveal.subject_token("0101", 17)
    assert not hasattr(reveal, "index")  # no tenant-wide index object to hand around any more


def test_dlq_fingerprints_use_one_derived_key_that_the_reveal_side_cannot_derive(master):
    """One DLQ fingerprint key (merged erasure-13 + crypto-13): HKDF of the index root with field `dlq`,
    purpose `fingerprint`, an HMAC key of its own; no separate tenant key, none on the reveal side."""
    store = _TenantKeys()
    keys = _manager(master, store)
    root = master.unwrap(store.keys[("bank-a", "index")], "tenant/bank-a/index")
    info = b"bg/index/v1" + b"".join(struct.pack(">I", len(p)) + p for p in (b"bank-a", b"dlq", b"fingerprint"))
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)
    from guard.keys.primitives import Hmac
    assert keys.dlq_hash.hexdigest("bg-dlq-key", b"k") == Hmac(derived).hexdigest("bg-dlq-key", b"k")
    assert all(purpose != "dlq-hash" for _, purpose in store.keys)
    reveal = _manager(master, _TenantKeys(), indexes=False)
    with pytest.raises(KeyUnavailableError):
        reveal.dlq_hash  # noqa: B018 - the property derives on access
