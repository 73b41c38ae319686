"""Forgeries by a party that can write `guard.audit` but holds no signing key, which verify let through.

- A real signed note copied into a forged record (a delete, a transfer, an erasure) with the
  ``bg-checkpoint`` header: only the note was checked, so the record passed as a checkpoint, `audit show`
  hid it, and the analyzer and the transfer report read its fields as facts.
- A record of a ``deletions/…`` chain in the audit topic, verified alone (a copy: ``--deletions-topic ''``):
  chains were chosen by name, so it was neither checked nor flagged.
- A record appended after the last checkpoint of a worker's side chain, which its writer checkpoints in
  every transaction that writes to it: it passed as a legitimately unanchored record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from confluent_kafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import guard.kafka.audit_chain as audit_chain
from guard.audit import merkle
from guard.audit.chain import CHECKPOINT_HEADER, LEAF_HEADER, Chain, leaf_bytes, leaf_prefix
from guard.audit.note import Checkpoint, Signer
from guard.audit.verify import Kept, Observed, origin, verify
from guard.cli.main import main
from guard.config import Settings
from guard.records.builders import OutRecord, RecordBuilder

SIGNER = Signer(Ed25519PrivateKey.generate())
VERIFIER = SIGNER.verifier()
SETTINGS = Settings(worker_id="w1")
CHAIN = "audit/br0101.public.customer:0/5f3a09c1"


class _Msg:
    def __init__(self, partition: int, offset: int, rec: OutRecord) -> None:
        self._partition, self._offset, self._rec = partition, offset, rec

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._rec.key

    def value(self) -> bytes | None:
        return self._rec.value

    def headers(self) -> list[tuple[str, Any]] | None:
        return self._rec.headers


class _Consumer:
    def __init__(self, _config: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _read(monkeypatch: pytest.MonkeyPatch, records: list[OutRecord]) -> tuple[list[Observed], list[Kept]]:
    """`read_topic` over these records (all in partition 0, in order), as verify reads a topic."""
    def read_to_end(_consumer: object, _topic: str, **_: object) -> Iterator[_Msg]:
        return iter([_Msg(0, i, r) for i, r in enumerate(records)])

    monkeypatch.setattr(audit_chain, "client_config", lambda _settings, **conf: conf)
    monkeypatch.setattr(audit_chain, "Consumer", _Consumer)
    monkeypatch.setattr(audit_chain, "read_to_end", read_to_end)
    return audit_chain.read_topic(SETTINGS, SETTINGS.audit_topic)


def _chain_records(builder: RecordBuilder, n: int) -> tuple[list[OutRecord], str]:
    """`n` audit records of CHAIN, then its checkpoint record as the writer builds it; and the note."""
    chain = Chain(CHAIN)
    out = []
    for i in range(n):
        rec = builder.audit("br0101.public.customer", 0, i, "customer", "c", None, "protected", None, {}, {})
        rec.headers = [(LEAF_HEADER, chain.stamp(rec.key, rec.value))]
        out.append(rec)
    note = SIGNER.sign_note(Checkpoint(origin(chain.id), chain.size, chain.root()).text())
    return [*out, builder.checkpoint(chain.id, chain.size, note)], note


def _forged(builder: RecordBuilder, note: str, tamper: str) -> OutRecord:
    """A record carrying a real note and the bg-checkpoint header, with one thing its writer never writes."""
    size = int(note.split("\n")[1])
    if tamper == "op delete":
        rec = builder.audit(CHAIN, -1, size, "customer", "delete", "tok-1", "erased_delete", note, {}, {})
    elif tamper == "decision transfer":
        rec = builder.audit(CHAIN, -1, size, None, "checkpoint", None, "transfer", note, {}, {})
    elif tamper == "other size":
        rec = builder.audit(CHAIN, -1, size + 7, None, "checkpoint", None, "checkpoint", note, {}, {})
    elif tamper == "a table":
        rec = builder.audit(CHAIN, -1, size, "customer", "checkpoint", None, "checkpoint", note, {"C3": 1}, {})
    else:
        rec = builder.checkpoint(CHAIN, size, note)
    rec.key = CHAIN.encode()
    rec.headers = [(CHECKPOINT_HEADER, CHAIN.encode())]
    if tamper == "other key":
        rec.key = b"br0101.public.customer:0"
    elif tamper == "another chain's header":
        rec.headers = [(CHECKPOINT_HEADER, b"audit/br0101.public.customer:1/00000000")]
    elif tamper == "a leaf too":
        rec.headers = [*rec.headers, (LEAF_HEADER, leaf_prefix(CHAIN, 99, bytes(32)))]
    return rec


@pytest.mark.parametrize("tamper", ["op delete", "decision transfer", "other size", "a table", "other key",
                                    "another chain's header", "a leaf too"])
def test_a_copied_note_in_a_forged_record_fails_verify(monkeypatch: pytest.MonkeyPatch, tamper: str) -> None:
    builder = RecordBuilder(SETTINGS, object(), clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]
    records, note = _chain_records(builder, 3)
    leaves, kept = _read(monkeypatch, records)
    assert [k.where for k in kept] == ["guard.audit[0]@3"]  # the writer's checkpoint record is a checkpoint
    assert verify(leaves, kept, VERIFIER, strict=True).ok

    leaves, kept = _read(monkeypatch, [*records, _forged(builder, note, tamper)])
    report = verify(leaves, kept, VERIFIER)
    assert not report.ok
    assert [(b.kind, b.where) for b in report.breaks] == [("inserted", "guard.audit[0]@4")], report.breaks
    assert "bg-checkpoint header that is not the checkpoint record" in report.breaks[0].detail
    # `audit show` lists the records it reads as leaves: the forged one is no longer hidden among checkpoints
    assert "guard.audit[0]@4" in [r.where for r in leaves]


def _stray_deletion(tmp_path: Path) -> tuple[list[Observed], list[Kept], Path]:
    """An intact audit chain of a copy, and one record of a deletions chain put into the copy."""
    key = tmp_path / "audit.pub"
    key.write_text(SIGNER.vkey() + "\n")
    records, kept = [], []
    for name, n in ((CHAIN, 3), ("deletions/cli:erase/0badc0de", 2)):
        chain = Chain(name)
        for i in range(n):
            value = b"%s %d" % (name.encode(), i)
            records.append(Observed("copy", 0, len(records), chain.stamp(b"k", value), b"k", value))
        kept.append(Kept(SIGNER.sign_note(Checkpoint(origin(name), n, chain.root()).text()), f"ckpt {name}"))
    return [*records[:3], records[4]], kept, key  # (the deletions chain's seq 1 only)


def test_a_deletions_record_in_an_audit_copy_verified_alone_is_reported(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import guard.cli.audit as cli

    leaves, kept, key = _stray_deletion(tmp_path)
    monkeypatch.setattr(cli, "_read", lambda *_: (leaves, kept))
    args = ["audit", "verify", "--audit-topic", "copy", "--deletions-topic", "", "--key", str(key)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "MOVED: chain deletions/cli:erase/0badc0de seq 1 at copy[0]@4" in result.output, result.output
    assert "in topic copy" in result.output
    # the deletions chain's checkpoints (kept in the audit topic) do not make it a removed chain, and the
    # audit chain itself verifies
    assert "REMOVED" not in result.output and f"chain {CHAIN}" not in result.output

    intact = [r for r in leaves if not r.header or b"deletions/" not in r.header]
    monkeypatch.setattr(cli, "_read", lambda *_: (intact, kept))
    assert CliRunner().invoke(main, args).exit_code == 0


def test_records_after_a_side_chains_last_checkpoint_are_reported() -> None:
    """A side chain (`<kind>/<transactional id>/<random>`) is checkpointed in every transaction that writes
    to it, as here with the worker's own chains: a record after its last checkpoint was added later."""
    settings = Settings(audit_checkpoint_records=1000, audit_checkpoint_s=30.0)
    cps: list[tuple[str, int, str]] = []

    def record(chain: str, size: int, note: str) -> OutRecord:
        cps.append((chain, size, note))
        return OutRecord(settings.audit_topic, chain.encode(), note.encode())

    chains = _audit_chains(settings, record)
    records = []
    for txn in range(3):  # three transactions, each with side records (as `_side_transaction` writes them)
        for i in range(2):
            value = b"erasure %d.%d" % (txn, i)
            headers = chains.headers(settings.audit_topic, b"erase", value, None) or []
            records.append(Observed("guard.audit", 0, len(records), dict(headers)[LEAF_HEADER], b"erase", value))
        chains.checkpoints()
        chains.committed()
    side = next(iter(chains.side.values())).id
    assert [size for c, size, _ in cps if c == side] == [2, 4, 6]  # every transaction's records checkpointed
    kept = [Kept(note, f"ckpt {size}") for _, size, note in cps]
    assert verify(records, kept, VERIFIER).ok

    last = records[-1]
    link = merkle.leaf_hash(leaf_bytes(last.header or b"", last.key, last.value))
    appended = Observed("guard.audit", 0, 6, leaf_prefix(side, 6, link), b"erase", b"a forged erasure_cancelled")
    report = verify([*records, appended], kept, VERIFIER)
    assert [(b.kind, b.chain, b.seq, b.where) for b in report.breaks] == [("inserted", side, 6, "guard.audit[0]@6")]
    assert "side chain" in report.breaks[0].detail
    # a worker's partition chain may still end in records no checkpoint covers yet (N records or T seconds)
    part = Chain("audit/br0101.public.customer:0/5f3a09c1")
    leaves = []
    for i in range(3):
        leaves.append(Observed("guard.audit", 1, i, part.stamp(b"k", b"%d" % i), b"k", b"%d" % i))
        if i == 0:
            kept.append(Kept(SIGNER.sign_note(Checkpoint(origin(part.id), 1, part.root()).text()), "ckpt p"))
    assert verify([*records, *leaves], kept, VERIFIER).ok


def _audit_chains(settings: Settings, record: Any) -> audit_chain.AuditChains:
    return audit_chain.AuditChains(settings, SIGNER, record,
                                   lambda tps: [TopicPartition(tp.topic, tp.partition, 0) for tp in tps],
                                   clock=lambda: 1.0)
