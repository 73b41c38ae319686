"""Tamperings of a copy of the audit topic that the first verifier let through (issue 14's acceptance check).

A record moved to another partition of the copy, records appended after the checkpoint of a one-shot
chain (a reveal call, `guard erase`), and a whole chain forged without a checkpoint: each must be named by
`verify`, while legitimately unanchored worker records (at most T seconds of them) still pass. A chain
without any checkpoint can only be forged because every writer checkpoints a chain in the transaction
that starts it (tested here for the worker's chains).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.audit import merkle
from guard.audit.chain import Chain, leaf_bytes, leaf_prefix
from guard.audit.note import Checkpoint, Signer
from guard.audit.verify import Kept, Observed, origin, verify

SIGNER = Signer(Ed25519PrivateKey.generate())
VERIFIER = SIGNER.verifier()


def _chain(chain_id: str, n: int, *, key: bytes, partition: int = 0, checkpoint_at: tuple[int, ...] = ()
           ) -> tuple[list[Observed], list[Kept]]:
    chain = Chain(chain_id)
    records, kept = [], []
    for i in range(n):
        value = b"%s record %d" % (chain_id.encode(), i)
        records.append(Observed("copy", partition, i, chain.stamp(key, value), key, value))
        if chain.size in checkpoint_at:
            kept.append(Kept(SIGNER.sign_note(Checkpoint(origin(chain.id), chain.size, chain.root()).text()),
                             f"ckpt {chain.size}"))
    return records, kept


def _renumber(records: list[Observed]) -> list[Observed]:
    offsets: dict[int, int] = {}
    out = []
    for r in records:
        offsets[r.partition] = offsets.get(r.partition, -1) + 1
        out.append(Observed(r.topic, r.partition, offsets[r.partition], r.header, r.key, r.value))
    return out


def test_a_record_moved_to_another_partition_is_named() -> None:
    records, kept = _chain("audit/raw:0/w1", 12, key=b"raw:0", checkpoint_at=(4, 8, 12))
    other, other_kept = _chain("audit/raw:1/w2", 6, key=b"raw:1", partition=1, checkpoint_at=(6,))
    assert verify(_renumber(records + other), kept + other_kept, VERIFIER).ok
    moved = Observed("copy", 1, 0, records[5].header, records[5].key, records[5].value)
    tampered = _renumber([*records[:5], *records[6:], *other, moved])
    report = verify(tampered, kept + other_kept, VERIFIER)
    assert not report.ok
    first = report.breaks[0]
    assert (first.kind, first.chain, first.seq) == ("moved", "audit/raw:0/w1", 5), first
    assert first.where.startswith("copy[1]@") and "partition 0" in first.detail


def test_records_appended_after_a_one_shot_chains_checkpoint_are_named() -> None:
    records, kept = _chain("audit/cli:reveal-host/abcd1234", 2, key=b"reveal:0101", checkpoint_at=(2,))
    assert verify(records, kept, VERIFIER).ok
    last = records[-1]
    link = merkle.leaf_hash(leaf_bytes(last.header or b"", last.key, last.value))
    appended = Observed("copy", 0, 2, leaf_prefix("audit/cli:reveal-host/abcd1234", 2, link), last.key,
                        b"a forged reveal_allowed")
    report = verify([*records, appended], kept, VERIFIER)
    assert not report.ok
    first = report.breaks[0]
    assert (first.kind, first.seq, first.where) == ("inserted", 2, "copy[0]@2"), first
    assert "one-shot" in first.detail


def test_a_forged_one_shot_chain_without_any_checkpoint_is_named() -> None:
    forged, _ = _chain("audit/cli:reveal-host/0badc0de", 3, key=b"reveal:0101")
    report = verify(forged, [], VERIFIER)
    assert [(b.kind, b.chain, b.seq) for b in report.breaks] == [("inserted", "audit/cli:reveal-host/0badc0de", 0)]


def test_a_workers_records_after_its_last_checkpoint_still_pass() -> None:
    """A worker checkpoints every N records or T seconds: its newest records are legitimately unanchored."""
    records, kept = _chain("audit/raw:0/w1", 7, key=b"raw:0", checkpoint_at=(4,))
    report = verify(records, kept, VERIFIER)
    assert report.ok and report.chains[0].unanchored == 3
    assert verify(records, kept, VERIFIER, strict=True).breaks[0].kind == "unanchored"


def test_a_forged_checkpoint_names_the_chain_it_claims() -> None:
    records, kept = _chain("audit/raw:0/w1", 4, key=b"raw:0", checkpoint_at=(4,))
    other = Signer(Ed25519PrivateKey.generate())
    chain = Chain("audit/raw:0/w1")
    for r in records:
        chain.stamp(r.key, r.value)
    forged = other.sign_note(Checkpoint(origin(chain.id), 5, chain.root()).text())
    report = verify(records, [*kept, Kept(forged, "copy[0]@9")], VERIFIER)
    assert [(b.kind, b.chain, b.where) for b in report.breaks] == [("forged_checkpoint", "audit/raw:0/w1", "copy[0]@9")]
    assert "claims to be of this chain" in report.breaks[0].detail


def test_a_forged_worker_chain_without_any_checkpoint_is_named() -> None:
    records, kept = _chain("audit/raw:0/w1", 4, key=b"raw:0", checkpoint_at=(4,))
    forged, _ = _chain("audit/raw:0/f0rged00", 2, key=b"raw:0")
    report = verify(_renumber([*records, *forged]), kept, VERIFIER)
    assert [(b.kind, b.chain, b.seq) for b in report.breaks] == [("inserted", "audit/raw:0/f0rged00", 0)]
    assert "no checkpoint" in report.breaks[0].detail


def test_a_workers_chain_is_checkpointed_in_the_transaction_that_starts_it() -> None:
    """What the check above relies on, even with a clock that has not yet run T seconds."""
    from confluent_kafka import TopicPartition

    from guard.config import Settings
    from guard.kafka.audit_chain import AuditChains
    from guard.records.builders import OutRecord

    settings = Settings(audit_checkpoint_records=1000, audit_checkpoint_s=30.0)

    def record(chain: str, size: int, note: str) -> OutRecord:
        return OutRecord(settings.audit_topic, chain.encode(), note.encode())

    chains = AuditChains(settings, SIGNER, record, lambda tps: [TopicPartition(tp.topic, tp.partition, 0)
                                                                for tp in tps], clock=lambda: 1.0)
    chains.headers(settings.audit_topic, b"raw:0", b"first", ("raw", 0))
    assert len(chains.checkpoints()) == 1
    chains.committed()
    chains.headers(settings.audit_topic, b"raw:0", b"second", ("raw", 0))
    assert chains.checkpoints() == []  # later ones at N records or T seconds
