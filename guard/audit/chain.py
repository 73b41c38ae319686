"""The leaf layout and one writer's chain: sequence numbers, the frontier, the tail it commits.

A chain is one Merkle tree with exactly one writer at a time. Every record of the chain carries a Kafka
header ``bg-leaf`` whose value is the *leaf prefix*::

    0x01                      layout version
    u16 big-endian            length of the chain id
    chain id                  UTF-8 (e.g. ``audit/br0101.public.customer:2/5f3a09c1``)
    u64 big-endian            sequence number (0, 1, 2, …, assigned by the writer; no gaps)
    32 bytes                  the leaf hash of the previous record of the chain (zeros for seq 0)

and the leaf the tree hashes is ``prefix || u32 len(key) || key || u32 len(value) || value`` (length
0xFFFFFFFF for a null key or value). The leaf covers the record's key, value and place in the chain, not
its topic, partition, offset or timestamp, so a copy of a topic verifies like the original and Kafka's
offsets (which transaction markers leave gaps in) play no part. The previous leaf's hash makes each
record vouch for its predecessor, so an altered record is named exactly (the next record's link no longer
matches), not only the checkpoint interval it lies in.

`Chain` is the writer's state: the next sequence number, the frontier (`merkle.Frontier`) and the last
leaf hash, with `snapshot`/`restore` for a transaction that aborts and `tail`/`from_tail` for the
compact string a worker commits with its input offsets (`guard.kafka.audit_chain`).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from guard.audit import merkle

LEAF_HEADER = "bg-leaf"
CHECKPOINT_HEADER = "bg-checkpoint"
LAYOUT_VERSION = 1
ZERO_HASH = bytes(32)
_NULL = 0xFFFFFFFF
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_NULL_LEN = _U32.pack(_NULL)


def leaf_prefix(chain: str, seq: int, prev: bytes) -> bytes:
    cid = chain.encode()
    return b"".join((bytes([LAYOUT_VERSION]), struct.pack(">H", len(cid)), cid, _U64.pack(seq), prev))


def leaf_bytes(prefix: bytes, key: bytes | None, value: bytes | None) -> bytes:
    return b"".join((prefix, _U32.pack(_NULL) if key is None else _U32.pack(len(key)), key or b"",
                     _U32.pack(_NULL) if value is None else _U32.pack(len(value)), value or b""))


@dataclass(frozen=True, slots=True)
class LeafPrefix:
    chain: str
    seq: int
    prev: bytes


def parse_prefix(prefix: bytes) -> LeafPrefix:
    """The chain, sequence number and link of a ``bg-leaf`` header; ValueError if malformed."""
    if len(prefix) < 3 or prefix[0] != LAYOUT_VERSION:
        raise ValueError("unknown leaf layout")
    n = struct.unpack_from(">H", prefix, 1)[0]
    if len(prefix) != 3 + n + 8 + 32:
        raise ValueError("bad leaf header length")
    chain = prefix[3:3 + n].decode()
    seq = _U64.unpack_from(prefix, 3 + n)[0]
    return LeafPrefix(chain, seq, prefix[3 + n + 8:])


class Chain:
    """One writer's chain: stamps records with (chain, seq, link) and keeps the tree's frontier."""

    __slots__ = ("id", "frontier", "prev", "checkpointed_size", "checkpointed_at", "_saved", "_head")

    def __init__(self, chain_id: str, frontier: merkle.Frontier | None = None, prev: bytes = ZERO_HASH) -> None:
        self.id = chain_id
        self.frontier = frontier or merkle.Frontier()
        self.prev = prev
        #: The size and (monotonic) time of the last checkpoint this writer emitted (-1: none yet).
        self.checkpointed_size = -1
        self.checkpointed_at = 0.0
        self._saved: tuple[merkle.Frontier, bytes] | None = None
        #: The constant start of every leaf prefix of the chain (version, id length, id).
        self._head = leaf_prefix(chain_id, 0, b"")[:-8]

    @property
    def size(self) -> int:
        return self.frontier.size

    def stamp(self, key: bytes | None, value: bytes | None) -> bytes:
        """Append a record as the next leaf; returns its ``bg-leaf`` header value.

        Runs once per audit record on the hot path: the hash is fed piecewise (the same bytes as
        `merkle.leaf_hash(leaf_bytes(prefix, key, value))`, tested) instead of building the leaf.
        """
        prefix = self._head + _U64.pack(self.frontier.size) + self.prev
        h = hashlib.sha256(b"\x00")
        h.update(prefix)
        if key is None:
            h.update(_NULL_LEN)
        else:
            h.update(_U32.pack(len(key)))
            h.update(key)
        if value is None:
            h.update(_NULL_LEN)
        else:
            h.update(_U32.pack(len(value)))
            h.update(value)
        digest = h.digest()
        self.frontier.append(digest)
        self.prev = digest
        return prefix

    def extend(self, leaves: bytes) -> None:
        """Append leaves already hashed elsewhere (32 bytes each, in order): the compiled path hashes the
        audit records of a native run where it builds them (`guard_native`, the same bytes as `stamp`, tested)
        and hands the hashes back here; the frontier is folded there too (`Frontier.extend`)."""
        self.frontier.extend(leaves)
        if leaves:
            self.prev = leaves[-32:]

    @property
    def head(self) -> bytes:
        """The constant start of the chain's leaf prefixes (layout version, id length, id)."""
        return self._head

    def root(self) -> bytes:
        return self.frontier.root()

    # ---- transactions ------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember the state at the start of a transaction (once per transaction)."""
        if self._saved is None:
            self._saved = (self.frontier.copy(), self.prev)

    def restore(self) -> None:
        """The transaction aborted: its leaves are not part of the tree."""
        if self._saved is not None:
            self.frontier, self.prev = self._saved
            self._saved = None

    def settle(self) -> None:
        """The transaction committed."""
        self._saved = None

    # ---- the committed tail ------------------------------------------------------------------------
    def tail(self) -> str:
        """``<chain id> <size> <base64(prev || frontier nodes)>``: all a new owner needs to continue."""
        blob = self.prev + b"".join(self.frontier.nodes)
        return f"{self.id} {self.frontier.size} {base64.b64encode(blob).decode()}"

    @classmethod
    def from_tail(cls, tail: str) -> Chain:
        chain_id, size, b64 = tail.split(" ")
        blob = base64.b64decode(b64, validate=True)
        n = int(size)
        if len(blob) != 32 * (1 + n.bit_count()):
            raise ValueError("a chain tail's frontier does not match its size")
        nodes = [blob[i:i + 32] for i in range(32, len(blob), 32)]
        return cls(chain_id, merkle.Frontier(n, nodes), blob[:32])
