"""RFC 6962 (section 2.1) Merkle tree hashing, as Certificate Transparency and C2SP tlogs use it.

leaf hash = SHA-256(0x00 || leaf), interior node = SHA-256(0x01 || left || right), the tree of n leaves
splits at the largest power of two smaller than n, and the empty tree's hash is SHA-256(""). The
prefixes keep a leaf from passing for a node (second-preimage attacks). Proof verification follows
RFC 9162 section 2.1.3.2 (inclusion) and 2.1.4.2 (consistency).

The writer keeps only a `Frontier` (the roots of the perfect subtrees the tree decomposes into,
popcount(n) hashes at most 64): appending a leaf costs amortised two hashes, and the root is one fold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

try:  # pragma: no cover - depends on whether the compiled extension was built
    from guard_native import frontier_extend as _frontier_extend
except ImportError:  # pragma: no cover
    _frontier_extend = None

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 6962 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root(hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash (MTH) of leaf hashes."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(root(hashes[:k]), root(hashes[k:]))


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path PATH(index, D[n]) of RFC 6962 2.1.1, leaf side first."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(hashes[:k], index), root(hashes[k:])]
    return [*inclusion_proof(hashes[k:], index - k), root(hashes[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """Whether `proof` shows the leaf hash `leaf` at `index` of the tree of `size` leaves with that root."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 2.1.2: the tree of `old_size` leaves is a prefix of this one."""
    n = len(hashes)
    if not 0 < old_size <= n:
        raise ValueError(f"no consistency proof from {old_size} to {n}")
    return _subproof(hashes, old_size, True)


def _subproof(hashes: Sequence[bytes], m: int, complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [root(hashes)]
    k = _split(n)
    if m <= k:
        return [*_subproof(hashes[:k], m, complete), root(hashes[k:])]
    return [*_subproof(hashes[k:], m - k, False), root(hashes[:k])]


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: whether `proof` shows the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if old_size == new_size:
        return not proof and old_root == new_root
    if not 0 < old_size < new_size or not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class Frontier:
    """The right edge of a growing tree: the roots of its perfect subtrees, largest (leftmost) first."""

    __slots__ = ("nodes", "size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if len(nodes) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier nodes, not {len(nodes)}")
        self.size = size
        self.nodes = list(nodes)

    def append(self, leaf_hash_: bytes) -> None:
        nodes, n = self.nodes, self.size
        nodes.append(leaf_hash_)
        while n & 1:
            right = nodes.pop()
            nodes[-1] = node_hash(nodes[-1], right)
            n >>= 1
        self.size += 1

    def extend(self, leaf_hashes: bytes) -> None:
        """`append` each of `leaf_hashes` (32 bytes each, in order): in the compiled extension when it is
        built (`guard_native.frontier_extend`, the same hashes; a native run's audit leaves are folded there
        instead of two hashlib calls and a few list operations per leaf in the interpreter)."""
        if len(leaf_hashes) % 32:
            raise ValueError(f"leaf hashes are 32 bytes each, got {len(leaf_hashes)} bytes")
        if _frontier_extend is not None:
            self.size, self.nodes = _frontier_extend(self.size, self.nodes, leaf_hashes)
            return
        for i in range(0, len(leaf_hashes), 32):
            self.append(leaf_hashes[i:i + 32])

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        h = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            h = node_hash(left, h)
        return h

    def copy(self) -> Frontier:
        return Frontier(self.size, self.nodes)
