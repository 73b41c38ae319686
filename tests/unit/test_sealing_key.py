"""`guard_native.SealingKey`: sealing in the compiled path (native/src/seal.rs) against the Python `Aead`.

The compiled path seals images in Rust (OpenSSL's AES-256-GCM and CSPRNG); what it writes must open with
the Python path's `Aead.open` (and the other way round), fail under another key or associated data, and
the key object must never give its key back.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest

from guard.errors import IntegrityError
from guard.keys.primitives import HEADER_BYTES, Aead, BlindIndex, KeyWrapper, random_key, sealed_header
from guard.protect.fastpath import native_available

pytestmark = pytest.mark.skipif(os.environ.get("NATIVE") == "0",
                                reason="NATIVE=0: built without the compiled hot path")


@pytest.fixture(scope="module")
def native():
    assert native_available(), "guard_native is not installed: run `make venv` (needs cargo), or NATIVE=0"
    import guard_native
    return guard_native


def test_every_aead_holds_its_native_twin_with_the_same_version(native):
    aead = Aead(random_key(), version=7)
    assert isinstance(aead.sealing_key, native.SealingKey)
    assert aead.sealing_key.version == 7


@pytest.mark.parametrize("plaintext", [b"", b"x", b'["\xe5\xbc\xa0\xe4\xb8\x89", 1, null]', bytes(range(256)) * 41])
def test_rust_sealed_values_open_with_the_python_aead_and_back(native, plaintext):
    aead = Aead(random_key(), version=3)
    aad = b"\x02" + b"topic|table|row|after|subject" * 3
    sealed = aead.sealing_key.seal(plaintext, aad)
    # The documented layout: format 1, key version, 12-byte nonce, ciphertext, 16-byte tag.
    assert sealed_header(sealed) == (1, 3)
    assert sealed[:5] == b"\x01\x00\x00\x00\x03"
    assert len(sealed) == HEADER_BYTES + len(plaintext) + 16
    assert aead.open(sealed, aad) == plaintext
    assert aead.sealing_key.open(aead.seal(plaintext, aad), aad) == plaintext
    assert aead.sealing_key.open(sealed, aad) == plaintext


def test_a_rust_sealed_value_fails_under_another_key_aad_or_version(native):
    aead = Aead(random_key(), version=1)
    sealed = aead.sealing_key.seal(b"secret", b"aad")
    with pytest.raises(IntegrityError, match="failed authentication"):
        aead.open(sealed, b"aaD")
    with pytest.raises(IntegrityError, match="failed authentication"):
        Aead(random_key(), version=1).open(sealed, b"aad")
    with pytest.raises(IntegrityError, match="key version 1"):
        Aead(random_key(), version=2).open(sealed, b"aad")
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        aead.open(bytes(tampered), b"aad")
    # The native `open` refuses the same.
    with pytest.raises(ValueError, match="failed authentication"):
        aead.sealing_key.open(sealed, b"other")
    with pytest.raises(ValueError, match="failed authentication"):
        native.SealingKey(random_key(), 1).open(sealed, b"aad")
    with pytest.raises(ValueError, match="key version 1"):
        native.SealingKey(random_key(), 2).open(sealed, b"aad")
    with pytest.raises(ValueError, match="too short"):
        aead.sealing_key.open(sealed[:20], b"aad")
    with pytest.raises(ValueError, match="format"):
        aead.sealing_key.open(b"\x02" + sealed[1:], b"aad")


def test_nonces_never_repeat_over_many_seals(native):
    key = native.SealingKey(random_key(), 1)
    nonces = {key.seal(b"same plaintext", b"same aad")[5:HEADER_BYTES] for _ in range(50_000)}
    assert len(nonces) == 50_000
    assert bytes(12) not in nonces


def test_a_forked_process_never_reuses_the_parents_nonces(native):
    """Nonces are drawn 64 at a time: a child forked with unused ones in its pool must draw its own."""
    key = native.SealingKey(random_key(), 1)
    key.seal(b"x", b"")  # this thread's pool now holds 63 unused nonces
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, b"".join(key.seal(b"x", b"")[5:HEADER_BYTES] for _ in range(63)))
        finally:
            os._exit(0)
    os.close(w)
    child = b""
    while chunk := os.read(r, 4096):
        child += chunk
    os.close(r)
    os.waitpid(pid, 0)
    parents = {key.seal(b"x", b"")[5:HEADER_BYTES] for _ in range(63)}
    childs = {child[i:i + 12] for i in range(0, len(child), 12)}
    assert len(childs) == 63 and len(parents) == 63
    assert not parents & childs


def test_a_key_must_be_32_bytes(native):
    for size in (0, 16, 31, 33):
        with pytest.raises(ValueError, match="32-byte"):
            native.SealingKey(b"k" * size, 1)


def test_the_key_object_never_shows_or_gives_back_its_key(native):
    key = bytes(range(32))
    sealing = native.SealingKey(key, 4)
    for text in (repr(sealing), str(sealing), format(sealing)):
        assert text == "SealingKey(version=4, key=<hidden>)"
    public = [name for name in dir(sealing) if not name.startswith("__")]
    assert sorted(public) == ["mint_keys", "open", "seal", "unwrap_keys", "version"]  # none returns a key
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(sealing, protocol=protocol)
    for clone in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            clone(sealing)
    with pytest.raises(TypeError):
        memoryview(sealing)  # no buffer protocol
    with pytest.raises(AttributeError):
        sealing.key  # noqa: B018
    # The Python wrapper's repr hides it too, and a pickled Aead would carry its sealing key: refused.
    aead = Aead(key, 4)
    assert repr(aead) == "Aead(version=4, key=<hidden>)"
    with pytest.raises(TypeError):
        pickle.dumps(aead)
    assert key.hex() not in repr(aead) + repr(sealing)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_native_tokens_are_the_blind_indexs_tokens(native, size):
    key = os.urandom(size)
    index = BlindIndex(key)
    assert isinstance(index.token_key, native.TokenKey)
    for value in (b"", b"13800001234", '"用户"'.encode(), bytes(range(256)) * 3):
        assert index.token_key.token(value) == index.token(value)


def test_the_token_key_never_shows_or_gives_back_its_key(native):
    key = bytes(range(32))
    token_key = native.TokenKey(key)
    assert repr(token_key) == str(token_key) == "TokenKey(key=<hidden>)"
    assert sorted(n for n in dir(token_key) if not n.startswith("__")) == ["token"]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(token_key, protocol=protocol)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.deepcopy(token_key)
    for bad in (b"", b"k" * 65):
        with pytest.raises(ValueError, match="1 to 64 bytes"):
            native.TokenKey(bad)


def test_wrapped_keys_keep_unwrapping_through_the_python_path(native):
    kek = KeyWrapper(random_key(), version=2)
    dek = random_key()
    assert kek.unwrap(kek.wrap(dek, "dek/0101/s"), "dek/0101/s") == dek


def test_with_the_extension_the_key_is_held_natively_only_and_both_paths_open_each_other(native, monkeypatch):
    """An `Aead` built with the extension seals and opens through its `SealingKey` and holds no `cryptography`
    AESGCM (the key in one place); one built without it (NATIVE=0) uses AESGCM. Each opens the other's
    values, and both refuse the same tampering with the same message."""
    from guard.keys import primitives

    key, aad = random_key(), b"\x02topic|table|row|after|subject"
    fast = Aead(key, version=4)
    assert fast.sealing_key is not None and fast._aead is None
    monkeypatch.setattr(primitives, "_SealingKey", None)
    slow, slow_kek = Aead(key, version=4), KeyWrapper(key, version=4)
    assert slow.sealing_key is None and slow._aead is not None
    for plaintext in (b"", b"secret", bytes(range(256)) * 9):
        assert slow.open(fast.seal(plaintext, aad), aad) == plaintext
        assert fast.open(slow.seal(plaintext, aad), aad) == plaintext
    monkeypatch.undo()
    fast_kek = KeyWrapper(key, version=4)
    assert fast_kek.sealing_key is not None
    assert fast_kek.unwrap(slow_kek.wrap(b"k" * 32, "dek/0101/s"), "dek/0101/s") == b"k" * 32
    assert slow_kek.unwrap(fast_kek.wrap(b"k" * 32, "dek/0101/s"), "dek/0101/s") == b"k" * 32
    for opener, sealer in ((slow, fast), (fast, slow)):
        with pytest.raises(IntegrityError, match="failed authentication: it was altered") as refused:
            opener.open(sealer.seal(b"secret", aad), aad + b"x")
        assert "secret" not in str(refused.value)


def test_a_batch_of_wrapped_keys_unwraps_natively_into_keys_that_match_the_python_path(native, monkeypatch):
    """`KeyWrapper.unwrap_aeads` (a prefetch's stored keys): each key is unwrapped in Rust into a `SealingKey`
    of its version, never a Python bytes object, and seals and opens exactly like the key unwrapped in
    Python; a wrapping under another name or key fails the whole batch with the position, never a key."""
    from guard.keys import primitives

    kek = KeyWrapper(random_key(), version=3)
    deks = [random_key() for _ in range(5)]
    items = [(kek.wrap(dek, f"dek/0101/s{i}"), f"dek/0101/s{i}", 1 + i % 2) for i, dek in enumerate(deks)]
    aeads = kek.unwrap_aeads(items)
    aad = b"\x02topic|table|row|after|subject"
    for aead, dek, (_, _, version) in zip(aeads, deks, items, strict=True):
        assert aead.version == aead.sealing_key.version == version and aead._aead is None
        assert repr(aead) == f"Aead(version={version}, key=<hidden>)"
        twin = Aead(dek, version=version)
        assert twin.open(aead.seal(b"secret", aad), aad) == b"secret"
        assert aead.open(twin.seal(b"secret", aad), aad) == b"secret"
        assert not any(isinstance(v, bytes) and dek in v for v in (getattr(aead, s) for s in Aead.__slots__))
    assert kek.unwrap_aeads([]) == []
    misnamed = [*items[:2], (items[2][0], "dek/0101/other", 1)]
    with pytest.raises(IntegrityError, match="wrapped key 2: ciphertext failed authentication") as refused:
        kek.unwrap_aeads(misnamed)
    assert all(dek.hex() not in str(refused.value) for dek in deks)
    with pytest.raises(IntegrityError, match="wrapped key 0: ciphertext is for key version 3"):
        KeyWrapper(random_key(), version=4).unwrap_aeads(items[:1])
    with pytest.raises(IntegrityError, match="wrapped key 0 does not hold a 32-byte key"):
        kek.unwrap_aeads([(kek.wrap(b"short", "dek/0101/x"), "dek/0101/x", 1)])
    with pytest.raises(ValueError, match="as many associated data and versions"):
        kek.sealing_key.unwrap_keys([items[0][0]], [], [1])
    # without the extension: the Python path unwraps each, with the same result
    monkeypatch.setattr(primitives, "_SealingKey", None)
    slow_kek = KeyWrapper(kek.unwrap(kek.wrap(b"k" * 32, "kek"), "kek"), version=3)  # any 32-byte KEK
    slow = slow_kek.unwrap_aeads([(slow_kek.wrap(deks[0], "dek/0101/s0"), "dek/0101/s0", 1)])
    assert slow[0]._aead is not None and slow[0].open(aeads[0].seal(b"x", aad), aad) == b"x"


def test_new_data_keys_are_minted_wrapped_and_held_inside_the_extension(native, monkeypatch):
    """`KeyWrapper.mint_aeads` (a prefetch's new keys, `subject_aead`'s): each key is drawn, wrapped and held
    in Rust; the wrapping unwraps (in Python, as another worker would) to a key that opens what the minted
    key sealed and the other way round; keys differ; the `Aead` holds no bytes of its key."""
    from guard.keys import primitives

    kek = KeyWrapper(random_key(), version=2)
    names = [f"dek/0101/s{i}" for i in range(4)]
    minted = kek.mint_aeads(names, 1)
    aad = b"\x02topic|table|row|after|subject"
    plain = []
    for (wrapped, aead), name in zip(minted, names, strict=True):
        assert wrapped[:5] == b"\x01\x00\x00\x00\x02" and aead.version == aead.sealing_key.version == 1
        assert aead._aead is None and repr(aead) == "Aead(version=1, key=<hidden>)"
        key = kek.unwrap(wrapped, name)
        plain.append(key)
        twin = Aead(key, version=1)
        assert twin.open(aead.seal(b"secret", aad), aad) == b"secret"
        assert aead.open(twin.seal(b"secret", aad), aad) == b"secret"
        assert not any(isinstance(v, bytes) and key in v for v in (getattr(aead, s) for s in Aead.__slots__))
        with pytest.raises(IntegrityError):
            kek.unwrap(wrapped, "dek/0101/another")  # the name is bound into the wrapping
    assert len(set(plain)) == len(plain) and kek.mint_aeads([], 1) == []
    rotated = kek.mint_wrapped("dek/0101/s0")
    assert len(kek.unwrap(rotated, "dek/0101/s0")) == 32 and kek.unwrap(rotated, "dek/0101/s0") not in plain
    # without the extension: drawn and wrapped in Python, the same layout
    monkeypatch.setattr(primitives, "_SealingKey", None)
    slow_kek = KeyWrapper(random_key(), version=2)
    (wrapped, aead), = slow_kek.mint_aeads(["dek/0101/s9"], 1)
    twin = Aead(slow_kek.unwrap(wrapped, "dek/0101/s9"), 1)
    assert aead._aead is not None and twin.open(aead.seal(b"x", aad), aad) == b"x"
