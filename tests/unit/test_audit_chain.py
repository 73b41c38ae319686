"""Signed notes (C2SP), checkpoints, signed confirmations, the leaf layout and the verifier's verdicts."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.audit import merkle
from guard.audit.chain import Chain, leaf_bytes, parse_prefix
from guard.audit.note import (
    Checkpoint,
    Signer,
    Verifier,
    generate_key_files,
    load_signer,
    load_verifier,
    open_checkpoint,
    open_note,
    verify_confirmation,
)
from guard.audit.verify import Kept, Observed, origin, prove, verify
from guard.errors import ConfigError

SIGNER = Signer(Ed25519PrivateKey.generate())
VERIFIER = SIGNER.verifier()


def test_signed_note_layout_and_forgery() -> None:
    note = SIGNER.sign_note("example.com/log\n3\n" + base64.b64encode(bytes(32)).decode() + "\n")
    text, sig_line = note.split("\n\n")
    assert sig_line.startswith("\u2014 branchguard-audit ") and sig_line.endswith("\n")
    raw = base64.b64decode(sig_line.split(" ")[2])
    assert raw[:4] == SIGNER.id and len(raw) == 68
    assert open_note(note, VERIFIER) == text + "\n"
    with pytest.raises(ValueError):
        open_note(note.replace("\n3\n", "\n4\n"), VERIFIER)
    other = Signer(Ed25519PrivateKey.generate()).verifier()
    with pytest.raises(ValueError):
        open_note(note, other)


def test_vkey_round_trip_and_checkpoint_parse() -> None:
    v = Verifier.parse(SIGNER.vkey())
    assert v.id == SIGNER.id and v.name == SIGNER.name
    cp = Checkpoint("branchguard.audit/x", 5, merkle.leaf_hash(b"a"))
    assert open_checkpoint(SIGNER.sign_note(cp.text()), v) == cp
    with pytest.raises(ConfigError):
        Verifier.parse(SIGNER.vkey().replace("+", "+00", 1))


def test_key_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "audit.key"
    signer = generate_key_files(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signer(path).vkey() == signer.vkey()
    assert load_verifier(path.with_suffix(".pub")).id == signer.id
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        load_signer(path)
    assert "PRIVATE" not in repr(signer) and signer.vkey() not in repr(signer)


def test_confirmation_signature_covers_every_member() -> None:
    signed = SIGNER.sign_confirmation({"type": "deletion_confirmation", "id": "c1", "subject": "s", "at_ms": 1})
    assert verify_confirmation(signed, VERIFIER)
    assert not verify_confirmation({**signed, "subject": "t"}, VERIFIER)
    assert not verify_confirmation({k: v for k, v in signed.items() if k != "signature"}, VERIFIER)
    # it survives a JSON round trip (the canonical bytes don't depend on member order)
    assert verify_confirmation(orjson.loads(orjson.dumps(dict(reversed(signed.items())))), VERIFIER)


def test_chain_tail_round_trip_and_abort() -> None:
    chain = Chain("audit/t:0/abc")
    for i in range(5):
        chain.stamp(b"k", b"v%d" % i)
    restored = Chain.from_tail(chain.tail())
    assert restored.size == 5 and restored.root() == chain.root() and restored.prev == chain.prev
    chain.snapshot()
    chain.stamp(b"k", b"aborted")
    chain.restore()
    assert chain.size == 5 and chain.root() == restored.root()
    header = restored.stamp(b"k", b"v5")
    assert parse_prefix(header).seq == 5 and parse_prefix(header).chain == "audit/t:0/abc"


# ---- the verifier ---------------------------------------------------------------------------------
def _write(n: int, chain_id: str = "audit/raw:0/c0", every: int = 4) -> tuple[list[Observed], list[Kept]]:
    chain = Chain(chain_id)
    records, kept = [], []
    for i in range(n):
        key, value = b"raw:0", b"record %d" % i
        records.append(Observed("guard.audit", 0, len(records) + len(kept), chain.stamp(key, value), key, value))
        if chain.size % every == 0 or i == n - 1:
            note = SIGNER.sign_note(Checkpoint(origin(chain.id), chain.size, chain.root()).text())
            kept.append(Kept(note, f"ckpt@{chain.size}"))
    return records, kept


def _renumber(records: list[Observed]) -> list[Observed]:
    return [Observed(r.topic, r.partition, i, r.header, r.key, r.value) for i, r in enumerate(records)]


def test_an_intact_chain_verifies() -> None:
    records, kept = _write(10)
    report = verify(records, kept, VERIFIER)
    assert report.ok and report.chains[0].records == 10 and report.chains[0].unanchored == 0


@pytest.mark.parametrize(("tamper", "kind", "seq"), [
    ("remove", "removed", 4),
    ("insert_copy", "inserted", 4),
    ("insert_plain", "inserted", None),
    ("swap", "reordered", 4),
    ("alter", "altered", 4),
    ("alter_last", "altered", 8),
    ("truncate", "truncated", 7),
])
def test_each_tampering_is_named(tamper: str, kind: str, seq: int | None) -> None:
    records, kept = _write(10)
    if tamper == "remove":
        del records[4]
    elif tamper == "insert_copy":
        records.insert(7, records[4])
    elif tamper == "insert_plain":
        records.insert(3, Observed("guard.audit", 0, 0, None, b"raw:0", b"forged"))
    elif tamper == "swap":
        records[4], records[5] = records[5], records[4]
    elif tamper in ("alter", "alter_last"):
        i = 4 if tamper == "alter" else 9
        r = records[i]
        records[i] = Observed(r.topic, r.partition, r.offset, r.header, r.key, r.value + b"!")
    elif tamper == "truncate":
        records = records[:7]
    report = verify(_renumber(records), kept, VERIFIER)
    assert not report.ok
    first = report.breaks[0]
    assert first.kind == kind
    if seq is not None:
        assert first.seq == seq
    if tamper == "alter_last":
        assert "[8, 10)" in first.detail


def test_forged_and_forked_checkpoints() -> None:
    records, kept = _write(8)
    other = Signer(Ed25519PrivateKey.generate())
    chain = Chain("audit/raw:0/c0")
    chain.stamp(b"x", b"y")
    forged = other.sign_note(Checkpoint(origin(chain.id), 1, chain.root()).text())
    report = verify(records, [*kept, Kept(forged, "forged")], VERIFIER)
    assert [b.kind for b in report.breaks] == ["forged_checkpoint"]
    fork = SIGNER.sign_note(Checkpoint(origin("audit/raw:0/c0"), 4, chain.root()).text())
    report = verify(records, [*kept, Kept(fork, "fork")], VERIFIER)
    assert report.breaks[0].kind == "fork"


def test_a_chain_removed_entirely_is_found_through_its_checkpoints() -> None:
    records, kept = _write(6)
    report = verify([], kept, VERIFIER)
    assert report.breaks[0].kind == "removed"


def test_unanchored_leaves_break_only_when_strict() -> None:
    records, kept = _write(6, every=4)
    assert verify(records, kept[:1], VERIFIER).ok
    assert verify(records, kept[:1], VERIFIER, strict=True).breaks[0].kind == "unanchored"


def test_prove_gives_an_offline_checkable_path() -> None:
    records, kept = _write(11)
    out = prove(records, kept, VERIFIER, "audit/raw:0/c0", 6)
    leaf = bytes.fromhex(out["leaf"])
    assert merkle.leaf_hash(leaf).hex() == out["leaf_hash"]
    assert leaf == leaf_bytes(records[6].header or b"", records[6].key, records[6].value)
    cp = open_checkpoint(out["checkpoint"], VERIFIER)
    assert cp.size == out["tree_size"] == 11
    assert merkle.verify_inclusion(merkle.leaf_hash(leaf), 6, cp.size, [bytes.fromhex(p) for p in out["proof"]],
                                   cp.root)


def test_a_missing_key_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no audit signing key"):
        load_signer(tmp_path / "absent.key")


def test_the_committed_tails_fit_kafkas_offset_metadata_limit() -> None:
    from guard.kafka.audit_chain import METADATA_MAX_BYTES, decode_metadata, encode_metadata

    size = 2**32 - 1  # the worst case up to 2^32 records: 32 frontier nodes
    chains = [Chain(f"{kind}/br0101.public.customer_transactions:11/0123abcd",
                    merkle.Frontier(size, [bytes([i]) * 32 for i in range(size.bit_count())]), bytes(32))
              for kind in ("audit", "deletions")]
    text = encode_metadata(chains)
    assert len(text.encode()) < METADATA_MAX_BYTES
    back = decode_metadata(text)
    assert set(back) == {"audit", "deletions"} and back["audit"].root() == chains[0].root()
    assert decode_metadata(None) == {} and decode_metadata("") == {}


@pytest.mark.parametrize(("key", "value"), [(b"k", b"v"), (None, b"v"), (b"k", None), (None, None), (b"", b"")])
def test_the_hot_path_stamp_hashes_the_documented_leaf(key: bytes | None, value: bytes | None) -> None:
    chain = Chain("audit/t:1/x")
    chain.stamp(b"first", b"record")
    prev = chain.prev
    prefix = chain.stamp(key, value)
    assert parse_prefix(prefix).prev == prev
    assert chain.prev == merkle.leaf_hash(leaf_bytes(prefix, key, value))


def test_leaves_hashed_elsewhere_fold_into_the_same_chain() -> None:
    """A native run hashes its audit records itself (`Chain.head`, size and `prev` in, leaf hashes out) and
    the chain folds them: the same tree, link and tail as stamping the records here."""
    stamped, folded = Chain("audit/t:1/x"), Chain("audit/t:1/x")
    records = [(b"t:1", b"a" * n) for n in range(7)]
    leaves = b""
    for key, value in records:
        prefix = stamped.stamp(key, value)
        assert prefix[:len(folded.head)] == folded.head
        leaves += stamped.prev
    folded.extend(leaves[:32 * 3])
    folded.extend(leaves[32 * 3:])
    folded.extend(b"")
    assert folded.tail() == stamped.tail() and folded.prev == stamped.prev and folded.root() == stamped.root()


def test_keygen_makes_a_private_key_once(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from guard.cli import main

    out = tmp_path / "k" / "audit.key"
    first = CliRunner().invoke(main, ["audit", "keygen", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert load_verifier(out.with_suffix(".pub")).id == load_signer(out).id
    assert "PRIVATE" not in first.output
    again = CliRunner().invoke(main, ["audit", "keygen", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output


def test_doctor_checks_the_signing_key_exists_with_mode_0600(tmp_path: Path) -> None:
    from guard.audit.note import generate_key_files
    from guard.config import Settings
    from guard.doctor.evidence import check_audit_signing_key

    key = tmp_path / "secrets" / "audit-signing.key"
    settings = Settings(audit_signing_key=str(key))
    missing = check_audit_signing_key(settings)
    assert not missing.ok and "does not exist" in missing.detail
    key.parent.mkdir()
    generate_key_files(key)
    good = check_audit_signing_key(settings)
    assert good.ok and "0600" in good.detail
    key.chmod(0o640)
    loose = check_audit_signing_key(settings)
    assert not loose.ok and "0640" in loose.detail and loose.action == f"chmod 600 {key}"


def test_the_audit_reader_uses_a_group_its_principal_may_use() -> None:
    from guard.config import Settings
    from guard.kafka.audit_chain import verify_group
    from guard.stack.kafka_auth import GUARD_TOOL_GROUPS, ONCALL_GROUPS

    assert verify_group(Settings(kafka_username="oncall")).startswith(ONCALL_GROUPS)
    assert verify_group(Settings(kafka_username="guard")).startswith(GUARD_TOOL_GROUPS)
