import pytest

from guard.errors import IntegrityError
from guard.keys.primitives import Aead, BlindIndex, KeyedHash, KeyWrapper, random_key, sealed_header


def test_seal_open_roundtrip_and_header():
    aead = Aead(random_key(), version=7)
    ct = aead.seal(b"secret", b"aad")
    assert sealed_header(ct) == (1, 7)
    assert aead.open(ct, b"aad") == b"secret"
    assert b"secret" not in ct


def test_wrong_aad_or_tamper_fails():
    aead = Aead(random_key(), version=1)
    ct = aead.seal(b"secret", b"topic-a|row-1")
    with pytest.raises(IntegrityError):
        aead.open(ct, b"topic-a|row-2")
    flipped = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(IntegrityError):
        aead.open(flipped, b"topic-a|row-1")
    with pytest.raises(IntegrityError):
        aead.open(ct[:10], b"topic-a|row-1")


def test_other_key_fails():
    ct = Aead(random_key(), 1).seal(b"x", b"")
    with pytest.raises(IntegrityError):
        Aead(random_key(), 1).open(ct, b"")


def test_nonces_differ():
    aead = Aead(random_key(), 1)
    assert aead.seal(b"x", b"") != aead.seal(b"x", b"")


def test_wrapper_binds_key_name():
    w = KeyWrapper(random_key(), 3)
    k = random_key()
    wrapped = w.wrap(k, "dek/0101/abc")
    assert w.unwrap(wrapped, "dek/0101/abc") == k
    with pytest.raises(IntegrityError):
        w.unwrap(wrapped, "dek/0101/abd")


def test_blind_index_deterministic_and_keyed():
    k = random_key()
    assert BlindIndex(k).token(b"13812345678") == BlindIndex(k).token(b"13812345678")
    assert BlindIndex(k).token(b"13812345678") != BlindIndex(random_key()).token(b"13812345678")
    assert len(BlindIndex(k).token(b"x")) == 32


def test_keyed_hash_domain_separated():
    h = KeyedHash(random_key())
    assert h.digest("pin", b"123456") != h.digest("password", b"123456")


def test_reprs_hide_keys():
    k = random_key()
    for obj in (Aead(k, 1), BlindIndex(k), KeyedHash(k)):
        assert k.hex() not in repr(obj) and "hidden" in repr(obj)
