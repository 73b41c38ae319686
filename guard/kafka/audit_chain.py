"""The worker's audit chains: which chain a record joins, the tail committed with the offsets, checkpoints.

One chain per input partition and kind (``audit`` for `guard.audit`, ``deletions`` for
`guard.deletions`): the records a worker writes for the events of raw partition P join P's chains. Only
the partition's owner writes them, and the consumer group plus transactional fencing make that owner
unique, so each chain has one writer at a time. The chain's tail (id, size, last leaf hash, frontier:
`Chain.tail`) is committed as the *metadata* of P's offset in `send_offsets_to_transaction`, atomically
with the records: an aborted transaction advances neither, and the next owner of P (this worker after a
restart, or another one after a rebalance) reads the tail with the committed offset and continues the
same tree. A partition whose committed offset carries no tail (first run, or offsets expired) starts a
new chain whose id ends in a fresh random suffix, so two trees never share an id.

The records a worker writes outside any input partition (scheduled erasures, re-emitted confirmations,
cancelled erasures) join a *side chain* of this incarnation (``<kind>/<transactional id>/<random>``),
checkpointed in every transaction that writes to it; a new incarnation starts a new side chain.

Size of the tail: ``<id> <size> <base64(32 × (1 + popcount(size)))>``: under 1.5 kB for a chain of 2^32
records, two kinds under 3 kB, within Kafka's `offset.metadata.max.bytes` (4096 by default).

Checkpoints go into the open transaction (`checkpoints`) when a chain grew by `audit_checkpoint_records`
or its last checkpoint is `audit_checkpoint_s` old, and between transactions for idle chains
(`idle_checkpoints`); after the commit the runner copies them into the second store (Redis,
`RedisKeyStore.put_audit_checkpoints`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from guard.audit.chain import CHECKPOINT_HEADER, LEAF_HEADER, Chain
from guard.audit.note import Signer
from guard.audit.verify import Kept, Observed, checkpoint_record_problem
from guard.audit.writer import new_chain_id, note_for
from guard.config import Settings
from guard.errors import GuardError
from guard.kafka.reading import READER_SETTINGS, TopicMissingError, read_to_end
from guard.kafka_security import client_config
from guard.records.builders import OutRecord
from guard.records.codec import decode

METADATA_MAGIC = "bg-audit-v1"
#: Kafka's default `offset.metadata.max.bytes`.
METADATA_MAX_BYTES = 4096

Headers = list[tuple[str, str | bytes | None]]


def encode_metadata(chains: Iterable[Chain]) -> str:
    text = "\n".join([METADATA_MAGIC, *(c.tail() for c in chains)])
    if len(text.encode()) > METADATA_MAX_BYTES:
        raise ValueError(f"chain tails of {len(text)} bytes exceed offset.metadata.max.bytes")
    return text


def decode_metadata(text: str | None) -> dict[str, Chain]:
    """kind → chain from a committed offset's metadata ({} when it carries no tail)."""
    if not text or not text.startswith(METADATA_MAGIC + "\n"):
        return {}
    out = {}
    for line in text.split("\n")[1:]:
        chain = Chain.from_tail(line)
        out[chain.id.split("/", 1)[0]] = chain
    return out


class AuditChains:
    """The chains of one worker, their in-transaction state and their checkpoints."""

    def __init__(self, settings: Settings, signer: Signer,
                 checkpoint_record: Callable[[str, int, str], OutRecord],
                 committed: Callable[[list[TopicPartition]], list[TopicPartition]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kinds = {settings.audit_topic: "audit", settings.deletions_topic: "deletions"}
        self.audit_topic = settings.audit_topic
        self.signer = signer
        self.every_n = max(1, settings.audit_checkpoint_records)
        self.every_s = settings.audit_checkpoint_s
        self._checkpoint_record = checkpoint_record
        self._committed = committed
        self._clock = clock
        self._txn_id = settings.transactional_id()
        self.partitions: dict[tuple[str, int], dict[str, Chain]] = {}
        self.side: dict[str, Chain] = {}
        self._by_key: dict[bytes, Chain] = {}
        #: Chains that took leaves or checkpoints in the open transaction.
        self._touched: dict[int, Chain] = {}
        #: (chain, size, note) of the checkpoints in the open transaction.
        self._notes: list[tuple[Chain, int, str]] = []

    # ---- stamping ------------------------------------------------------------------------------------
    def headers(self, topic: str, key: bytes | None, value: bytes | None,
                source: tuple[str, int] | None, headers: Headers | None = None) -> Headers | None:
        """`headers` plus ``bg-leaf`` when `topic` is chained (the record joins its chain); else as given."""
        kind = self.kinds.get(topic)
        if kind is None:
            return headers
        chain = self.side_chain(kind) if source is None else self.partition_chain(source, kind)
        self._touch(chain)
        prefix = chain.stamp(key, value)
        return [*(headers or ()), (LEAF_HEADER, prefix)]

    def _audit_chain(self, key: bytes) -> Chain:
        chain = self._by_key.get(key)
        if chain is None:
            topic, _, partition = key.decode().rpartition(":")
            chain = self.partition_chain((topic, int(partition)), "audit")
            self._by_key[key] = chain
        self._touch(chain)
        return chain

    # ---- a native run's side (`guard_native.FastPath.run(chains=...)`) --------------------------------
    def open(self, key: bytes) -> tuple[bytes, int, bytes]:
        """(head, next sequence number, previous leaf hash) of the audit chain of `key`, for a native run
        that stamps and hashes its audit records itself; the chain joins the open transaction."""
        chain = self._audit_chain(key)
        return chain.head, chain.size, chain.prev

    def fold(self, key: bytes, leaves: bytes) -> None:
        """The leaf hashes a native run appended to the chain of `key` (after `open`), in order."""
        self._by_key[key].extend(leaves)

    def _touch(self, chain: Chain) -> None:
        if id(chain) not in self._touched:
            chain.snapshot()
            self._touched[id(chain)] = chain

    def partition_chain(self, source: tuple[str, int], kind: str) -> Chain:
        chains = self.partitions.get(source)
        if chains is None:
            self.load([source])
            chains = self.partitions[source]
        chain = chains.get(kind)
        if chain is None:
            chain = chains[kind] = Chain(new_chain_id(kind, f"{source[0]}:{source[1]}"))
        return chain

    def side_chain(self, kind: str) -> Chain:
        chain = self.side.get(kind)
        if chain is None:
            chain = self.side[kind] = Chain(new_chain_id(kind, self._txn_id))
        return chain

    def load(self, sources: Iterable[tuple[str, int]]) -> None:
        """Read the committed tails of input partitions (one offset fetch for all of them)."""
        wanted = [TopicPartition(t, p) for t, p in sources if (t, p) not in self.partitions]
        if not wanted:
            return
        for tp in self._committed(wanted):
            self.partitions[(tp.topic, tp.partition)] = decode_metadata(tp.metadata)

    # ---- the committed tail ------------------------------------------------------------------------
    def metadata(self, sources: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The offset metadata for each input partition of a commit: its chains' tails after it."""
        sources = list(sources)
        self.load(sources)
        return {s: encode_metadata(self.partitions[s].values()) for s in sources}

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self, *, idle: bool = False, final: bool = False) -> list[OutRecord]:
        """Checkpoint records due in the open transaction: chains it touched (all loaded chains if `idle`)
        that grew by N records or whose last checkpoint is T seconds old; side chains at every commit.
        `final` (a worker stopping cleanly): every loaded chain that grew since its last checkpoint, so no
        record this worker wrote stays unanchored until another worker owns its partition."""
        now = self._clock()
        candidates: list[tuple[Chain, bool]] = []
        if idle or final:
            candidates += [(c, final) for chains in self.partitions.values() for c in chains.values()]
            candidates += [(c, final) for c in self.side.values()]
        else:
            side = {id(c) for c in self.side.values()}
            candidates += [(c, id(c) in side) for c in self._touched.values()]
        out = []
        for chain, always in candidates:
            if chain.size == 0:
                continue
            grown = chain.size - max(chain.checkpointed_size, 0)
            # A chain's first transaction (here) always checkpoints it: verify takes a chain that no checkpoint
            # covers at all for a forged one.
            due = chain.checkpointed_size < 0 or (always and chain.size != chain.checkpointed_size) or \
                grown >= self.every_n or now - chain.checkpointed_at >= self.every_s
            if not due or any(c is chain for c, _, _ in self._notes):
                continue
            note = note_for(self.signer, chain)
            self._touch(chain)
            self._notes.append((chain, chain.size, note))
            out.append(self._checkpoint_record(chain.id, chain.size, note))
        return out

    def load_assigned(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Before idle checkpoints: the chains of every assigned partition (after a restart, say)."""
        self.load(assigned)

    # ---- transaction outcomes ------------------------------------------------------------------------
    def committed(self) -> list[tuple[str, int, str]]:
        """The open transaction committed: its leaves are in the tree; returns its checkpoints."""
        now = self._clock()
        for chain in self._touched.values():
            chain.settle()
        notes = [(chain.id, size, note) for chain, size, note in self._notes]
        for chain, size, _ in self._notes:
            chain.checkpointed_size, chain.checkpointed_at = size, now
        self._touched.clear()
        self._notes.clear()
        return notes

    def aborted(self) -> None:
        """The open transaction aborted: none of its leaves or checkpoints count."""
        for chain in self._touched.values():
            chain.restore()
        self._touched.clear()
        self._notes.clear()

    def reset(self, *, outcome_unknown: bool = False) -> None:
        """Forget the partition chains (they are reloaded from the committed tails when next needed).

        `outcome_unknown`: the last commit may or may not have gone through (a replaced producer), so
        this incarnation's side chains are left as they are and new ones begin.
        """
        self.aborted()
        self.partitions.clear()
        self._by_key.clear()
        if outcome_unknown:
            self.side.clear()


# ---- reading a chained topic back (guard audit verify / prove) ----------------------------------------------
def verify_group(settings: Settings) -> str:
    """The reader's one fixed group id, inside the prefix its principal's ACLs allow.

    `guard audit verify|prove` is meant to run as ``oncall`` (read-only on the audit and deletions
    topics, groups ``oncall-*``: least privilege); run as ``guard`` or ``admin`` it uses the guard's tool
    prefix ``guard-*``. The reader only assigns partitions at explicit offsets, so it never joins the group
    or commits; the id is fixed so that a group ACL, if the broker asks for one, can name it.
    """
    return "oncall-audit-verify" if settings.kafka_username == "oncall" else "guard-audit-verify"


def read_topic(settings: Settings, topic: str, *, since_ms: int = 0, confirmations: bool = False,
               stall_s: float = 120.0) -> tuple[list[Observed], list[Kept]]:
    """Every committed record of `topic` (read_committed, from `since_ms` on): leaves and checkpoints.

    Each record is sorted by `observe`: a checkpoint record (as its writer builds it) gives a `Kept`, every
    other record is a leaf candidate (`Observed`).
    """
    # Security settings from kafka_security (the settings' principal); one fixed group id (verify_group).
    consumer = Consumer(client_config(settings, **{"group.id": verify_group(settings), **READER_SETTINGS}))
    leaves: list[Observed] = []
    kept: list[Kept] = []
    try:
        for msg in read_to_end(consumer, topic, since_ms=since_ms, stall_s=stall_s):
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            raw = msg.headers() or []
            headers = list(raw.items()) if isinstance(raw, dict) else raw
            got = observe(topic, partition, offset, msg.key(), msg.value(), headers, confirmations)
            if isinstance(got, Kept):
                kept.append(got)
            else:
                leaves.append(got)
        return leaves, kept
    except TopicMissingError:
        raise GuardError(f"topic {topic} does not exist or {settings.kafka_username} may not describe it "
                         "(verify as oncall reads the audit and deletions topics only: docs/audit.md)") from None
    finally:
        consumer.close()


def observe(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
            headers: Sequence[tuple[str, object]], confirmations: bool = False) -> Observed | Kept:
    """One record as verify reads it: a checkpoint (`Kept`, its signed note) or a leaf candidate (`Observed`,
    its ``bg-leaf`` header if any).

    A record with a ``bg-checkpoint`` header is a checkpoint only if it is exactly the record its writer
    builds (`guard.audit.verify.checkpoint_record_problem`): only the note is signed, so on the header alone
    a real note copied into a forged delete or transfer record passed verify and was hidden by `audit show`.
    Any other record with the header is a leaf candidate carrying the problem, which verify reports.
    """
    where = f"{topic}[{partition}]@{offset}"
    marks = [v for k, v in headers if k == CHECKPOINT_HEADER]
    leaf = [v for k, v in headers if k == LEAF_HEADER]
    header = leaf[-1] if leaf and isinstance(leaf[-1], bytes) else None
    if not marks:
        return Observed(topic, partition, offset, header, key, value, confirmations)
    try:
        doc: dict[str, Any] | None = decode(value or b"")
    except Exception:  # noqa: BLE001 - an undecodable checkpoint record is not one its writer built
        doc = None
    problem = checkpoint_record_problem(doc, key, marks, bool(leaf))
    if problem is None and doc is not None:
        return Kept(str(doc["reason"]), where)
    return Observed(topic, partition, offset, header, key, value, confirmations, problem or "undecodable")


def second_store(notes: dict[str, str]) -> list[Kept]:
    """The second store's checkpoints as `Kept` entries."""
    return [Kept(note, f"second store ({field})") for field, note in sorted(notes.items())]
