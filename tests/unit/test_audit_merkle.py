"""RFC 6962 hashing against the Certificate Transparency reference vectors; proofs checked with Hypothesis."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.audit import merkle

# The reference leaves and tree heads of RFC 6962's reference implementation (certificate-transparency,
# merkle_tree_test), used by every CT/tlog implementation's tests.
CT_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
HASHES = [merkle.leaf_hash(leaf) for leaf in CT_LEAVES]


def test_hash_prefixes() -> None:
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert merkle.node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


def test_reference_roots_recursive_and_frontier() -> None:
    frontier = merkle.Frontier()
    for size, want in enumerate(CT_ROOTS):
        assert merkle.root(HASHES[:size]).hex() == want
        assert frontier.root().hex() == want
        if size < len(HASHES):
            frontier.append(HASHES[size])


def test_reference_inclusion_proofs() -> None:
    for index, size, proof in CT_INCLUSION:
        assert [p.hex() for p in merkle.inclusion_proof(HASHES[:size], index)] == proof
        assert merkle.verify_inclusion(HASHES[index], index, size, [bytes.fromhex(p) for p in proof],
                                       bytes.fromhex(CT_ROOTS[size]))


hash_lists = st.lists(st.binary(min_size=0, max_size=8), min_size=1, max_size=70, unique=True).map(
    lambda leaves: [merkle.leaf_hash(b) for b in leaves])


@given(hash_lists, st.data())
def test_inclusion_proofs_verify_and_nothing_else_does(hashes: list[bytes], data: st.DataObject) -> None:
    n = len(hashes)
    index = data.draw(st.integers(0, n - 1))
    r = merkle.root(hashes)
    proof = merkle.inclusion_proof(hashes, index)
    assert merkle.verify_inclusion(hashes[index], index, n, proof, r)
    # another leaf, another index or a changed path fail (leaves are distinct)
    assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), index, n, proof, r)
    if n > 1:
        assert not merkle.verify_inclusion(hashes[index], (index + 1) % n, n, proof, r)
        bad = list(proof)
        bad[data.draw(st.integers(0, len(bad) - 1))] = bytes(32)
        assert not merkle.verify_inclusion(hashes[index], index, n, bad, r)
    assert not merkle.verify_inclusion(hashes[index], index, index, proof, r)  # an index outside the tree


@given(hash_lists, st.data())
def test_consistency_proofs(hashes: list[bytes], data: st.DataObject) -> None:
    n = len(hashes)
    m = data.draw(st.integers(1, n))
    proof = merkle.consistency_proof(hashes, m)
    old, new = merkle.root(hashes[:m]), merkle.root(hashes)
    assert merkle.verify_consistency(m, n, old, new, proof)
    if m < n:
        assert not merkle.verify_consistency(m, n, merkle.leaf_hash(b"other"), new, proof)
        assert not merkle.verify_consistency(m, n, old, merkle.leaf_hash(b"other"), proof)


@given(hash_lists)
def test_frontier_matches_the_recursive_root(hashes: list[bytes]) -> None:
    frontier = merkle.Frontier()
    for i, h in enumerate(hashes):
        frontier.append(h)
        assert len(frontier.nodes) == (i + 1).bit_count()
    assert frontier.root() == merkle.root(hashes)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(0, 70), st.integers(0, 2**40))
def test_extend_folds_many_leaves_as_append_does_one_by_one(start: int, count: int, offset: int) -> None:
    """`Frontier.extend` (in the compiled extension when built: `guard_native.frontier_extend`) gives the
    frontier and root that appending each leaf in Python gives, from any tree size (a large one too)."""
    seed = [merkle.leaf_hash(b"s%d" % i) for i in range(start)]
    big = offset if offset.bit_count() <= 40 else 0
    base = merkle.Frontier()
    for h in seed:
        base.append(h)
    if big:  # a frontier of a tree of `big + start` leaves: any nodes do for the fold itself
        base = merkle.Frontier(big, [merkle.leaf_hash(b"n%d" % i) for i in range(big.bit_count())])
    leaves = [merkle.leaf_hash(b"x%d" % i) for i in range(count)]
    one_by_one, at_once = base.copy(), base.copy()
    for h in leaves:
        one_by_one.append(h)
    at_once.extend(b"".join(leaves))
    assert (at_once.size, at_once.nodes) == (one_by_one.size, one_by_one.nodes)
    assert at_once.root() == one_by_one.root()
    if not big:
        assert at_once.root() == merkle.root(seed + leaves)


def test_extend_refuses_a_partial_hash_and_a_frontier_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="32 bytes each"):
        merkle.Frontier().extend(b"x" * 33)
    broken = merkle.Frontier(3, [merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")])
    broken.nodes.pop()
    with pytest.raises(ValueError, match="frontier nodes"):
        broken.extend(merkle.leaf_hash(b"c"))


def test_the_compiled_fold_is_the_one_in_use() -> None:
    """With the extension built, the fold runs there (not silently in the interpreter)."""
    if os.environ.get("NATIVE") == "0":
        assert merkle._frontier_extend is None
    else:
        assert merkle._frontier_extend is not None


def test_the_interpreters_fold_gives_the_same_frontier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension (`NATIVE=0`), `extend` appends leaf by leaf: the same frontier."""
    leaves = [merkle.leaf_hash(b"y%d" % i) for i in range(37)]
    native = merkle.Frontier()
    native.extend(b"".join(leaves))
    monkeypatch.setattr(merkle, "_frontier_extend", None)
    python = merkle.Frontier()
    python.extend(b"".join(leaves))
    assert (python.size, python.nodes) == (native.size, native.nodes) == (37, python.nodes)
    assert python.root() == merkle.root(leaves)
