"""The worker's chains (`guard.kafka.audit_chain.AuditChains`): stamping, abort, tails, checkpoint pacing."""

from __future__ import annotations

from confluent_kafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.audit.chain import LEAF_HEADER, parse_prefix
from guard.audit.note import Signer, open_checkpoint
from guard.audit.verify import Kept, Observed, verify
from guard.config import Settings
from guard.kafka.audit_chain import AuditChains
from guard.records.builders import OutRecord

SIGNER = Signer(Ed25519PrivateKey.generate())
SETTINGS = Settings(audit_checkpoint_records=3, audit_checkpoint_s=10.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(committed: dict[tuple[str, int], str] | None = None) -> tuple[AuditChains, Clock, list[list[TopicPartition]]]:
    clock, fetched = Clock(), []
    store = committed if committed is not None else {}

    def fetch(tps: list[TopicPartition]) -> list[TopicPartition]:
        fetched.append(tps)
        return [TopicPartition(tp.topic, tp.partition, 0, store[(tp.topic, tp.partition)])
                if (tp.topic, tp.partition) in store else TopicPartition(tp.topic, tp.partition, 0) for tp in tps]

    def record(chain: str, size: int, note: str) -> OutRecord:
        return OutRecord(SETTINGS.audit_topic, chain.encode(), note.encode())

    return AuditChains(SETTINGS, SIGNER, record, fetch, clock), clock, fetched


def seq_of(headers: list[tuple[str, str | bytes | None]] | None) -> tuple[str, int]:
    value = dict(headers or [])[LEAF_HEADER]
    assert isinstance(value, bytes)
    p = parse_prefix(value)
    return p.chain, p.seq


def test_only_chained_topics_are_stamped_and_an_abort_takes_the_numbers_back() -> None:
    chains, _, fetched = make()
    assert chains.headers("sanitized.x", b"k", b"v", ("raw", 0)) is None
    chain, seq = seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v0", ("raw", 0)))
    assert seq == 0 and chain.startswith("audit/raw:0/") and len(fetched) == 1
    chains.committed()
    assert seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v1", ("raw", 0)))[1] == 1
    chains.aborted()
    assert seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v1", ("raw", 0)))[1] == 1
    assert seq_of(chains.headers(SETTINGS.deletions_topic, b"s", b"{}", ("raw", 0)))[0].startswith("deletions/raw:0/")
    assert seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"x", None))[0].startswith(
        f"audit/{SETTINGS.transactional_id()}/")


def test_a_new_owner_continues_from_the_committed_tail() -> None:
    first, _, _ = make()
    leaves = []
    for i in range(5):
        headers = first.headers(SETTINGS.audit_topic, b"raw:0", b"v%d" % i, ("raw", 0))
        leaves.append(Observed("a", 0, i, dict(headers or [])[LEAF_HEADER], b"raw:0", b"v%d" % i))  # type: ignore[arg-type]
    tails = first.metadata([("raw", 0)])
    first.committed()
    second, _, _ = make(dict(tails))
    for i in range(5, 8):
        headers = second.headers(SETTINGS.audit_topic, b"raw:0", b"v%d" % i, ("raw", 0))
        leaves.append(Observed("a", 0, i, dict(headers or [])[LEAF_HEADER], b"raw:0", b"v%d" % i))  # type: ignore[arg-type]
    notes = [Kept(r.value.decode(), "t") for r in second.checkpoints() if r.value]
    assert notes and open_checkpoint(notes[0].note, SIGNER.verifier()).size == 8
    assert verify(leaves, notes, SIGNER.verifier()).ok


def test_checkpoints_every_n_records_or_t_seconds_and_only_once_committed() -> None:
    chains, clock, _ = make()
    chains.headers(SETTINGS.audit_topic, b"k", b"v", ("raw", 0))
    first = chains.checkpoints()  # never checkpointed yet: due at once
    assert len(first) == 1
    chains.aborted()  # the checkpoint's transaction aborted: it doesn't count
    chains.headers(SETTINGS.audit_topic, b"k", b"v", ("raw", 0))
    assert len(chains.checkpoints()) == 1
    assert [size for _, size, _ in chains.committed()] == [1]
    chains.headers(SETTINGS.audit_topic, b"k", b"v2", ("raw", 0))
    assert chains.checkpoints() == []  # 1 new record < N = 3, 0 s < T = 10
    chains.committed()
    for i in range(2):
        chains.headers(SETTINGS.audit_topic, b"k", b"v%d" % (i + 3), ("raw", 0))
    assert len(chains.checkpoints()) == 1  # 3 new records
    chains.committed()
    assert chains.checkpoints(idle=True) == []
    clock.now += 10
    idle = chains.checkpoints(idle=True)  # no new record, T seconds: an idle checkpoint
    assert len(idle) == 1
    assert [size for _, size, _ in chains.committed()] == [4]


def test_a_clean_stop_checkpoints_every_chain_that_grew_and_no_other() -> None:
    chains, clock, _ = make()
    for i in range(3):
        chains.headers(SETTINGS.audit_topic, b"k", b"v%d" % i, ("raw", 0))
        chains.headers(SETTINGS.audit_topic, b"k", b"w%d" % i, ("raw", 1))
    chains.checkpoints()
    chains.committed()  # both chains checkpointed at 3
    chains.headers(SETTINGS.audit_topic, b"k", b"v3", ("raw", 0))  # partition 0 grows by one ...
    chains.checkpoints()
    chains.committed()  # ... below N and T: not checkpointed in its transaction
    assert chains.checkpoints(idle=True) == []
    final = chains.checkpoints(final=True)
    assert len(final) == 1, "the chain that grew, and only it"
    assert [size for _, size, _ in chains.committed()] == [4]
    assert chains.checkpoints(final=True) == []


def test_reset_after_an_unknown_outcome_starts_a_new_side_chain() -> None:
    chains, _, fetched = make()
    side = seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v", None))[0]
    chains.headers(SETTINGS.audit_topic, b"k", b"v", ("raw", 0))
    chains.reset()
    assert seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v", None))[0] == side
    chains.headers(SETTINGS.audit_topic, b"k", b"v", ("raw", 0))
    assert len(fetched) == 2  # the partition's tail is read again
    chains.reset(outcome_unknown=True)
    assert seq_of(chains.headers(SETTINGS.audit_topic, b"k", b"v", None))[0] != side
