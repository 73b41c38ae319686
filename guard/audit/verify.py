"""What `guard audit verify` concludes from the records and checkpoints it read, and `prove`'s proofs.

Input: the records of the chained topics as read (`Observed`, in offset order per topic partition) and
every kept checkpoint (`Kept`: the checkpoint records of the audit topic and the copies of the second
store). Per chain the verifier:

1. checks each checkpoint's signature (one that fails is a ``forged_checkpoint``) and that no two
   checkpoints of one size disagree (``fork``);
2. groups the records by sequence number: a second record with the same number is ``inserted`` (of two,
   the one whose hash the neighbours' links vouch for is kept); a record without a valid ``bg-leaf``
   header in a chained topic is ``inserted`` too;
3. in each topic partition the sequence numbers must rise: one lower than a record before it is
   ``reordered``;
4. a missing number below the chain's highest one is ``removed``; a chain shorter than a checkpoint says
   is ``truncated`` (a checkpoint with no record left at all: the whole chain was removed);
5. each record's link must be the previous record's leaf hash, else the previous record was ``altered``;
6. the root of the first `size` leaves must equal every checkpoint's root. A mismatch the steps before
   did not explain is reported as ``altered`` somewhere in the interval since the last matching checkpoint.

Per chain the first break (lowest sequence number) is reported. Leaves after a chain's last checkpoint
are *unanchored*: counted, not a break (a worker checkpoints its partition chains every N records or T
seconds), unless `strict` is set, or the chain is one whose writer checkpoints every record in the write
that adds it (`checkpointed_with_records`: one-shot and side chains), where such a leaf was added later.

Besides the chains: a record with a ``bg-checkpoint`` header that is not exactly the checkpoint record the
writer builds (`checkpoint_record_problem`) is reported as ``inserted``, since only its note is signed and
the rest could say anything; and, given the topic each kind of chain is written to (`verify(topics=...)`),
a record found in another topic is ``moved``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from guard.audit import merkle
from guard.audit.chain import ZERO_HASH, leaf_bytes, parse_prefix
from guard.audit.note import Checkpoint, Verifier, open_checkpoint, verify_confirmation

#: Checkpoint origins are this prefix + the chain id.
ORIGIN_PREFIX = "branchguard.audit/"


def origin(chain: str) -> str:
    return ORIGIN_PREFIX + chain


def checkpoint_record_problem(doc: Mapping[str, Any] | None, key: bytes | None, marks: Sequence[object],
                              leaf: bool) -> str | None:
    """Why a record with a ``bg-checkpoint`` header is not the checkpoint record its writer builds (None: it is).

    Only the note in `reason` is signed; the rest of the record is not covered by anything. Taken on the
    header alone, a note copied into a forged record (op ``delete``, decision ``transfer``, ...) passed
    verify while readers of the topic take the record's fields as facts. So a checkpoint is accepted only
    as `RecordBuilder.checkpoint` writes it: one ``bg-checkpoint`` header, the Kafka key and
    `source_topic` both the chain id that header names, no ``bg-leaf`` header (it is not a leaf), op and
    decision ``checkpoint``, the note (of that chain) as `reason`, the note's tree size as `source_offset`,
    `source_partition` -1 and nothing else (no table, subject, classes, actions or unclassified fields).
    Not compared: `v`, `ts_ms`, `worker`, `branch` and `trace_id`, which say who wrote it and when (the
    writer fills them from its settings, its clock and the event in hand) and differ between genuine
    checkpoints. `doc`: the record decoded with the audit schema (None: it does not decode).
    """
    if len(marks) != 1 or not isinstance(marks[0], bytes):
        return f"{len(marks)} bg-checkpoint headers, the writer's is one naming the chain"
    try:
        chain = marks[0].decode()
    except UnicodeDecodeError:
        return "its bg-checkpoint header is not a chain id"
    if doc is None:
        return f"it does not decode as an audit record (chain {chain})"
    if leaf:
        return f"it carries a bg-leaf header too; a checkpoint of chain {chain} is not a leaf"
    if key != marks[0]:
        return f"its key is not its chain's ({chain})"
    note = doc.get("reason")
    lines = note.split("\n") if isinstance(note, str) else []
    if len(lines) < 2 or lines[0] != origin(chain) or not lines[1].isdigit():
        return f"its reason is not a checkpoint note of chain {chain}"
    want: dict[str, Any] = {"op": "checkpoint", "decision": "checkpoint", "source_topic": chain,
                            "source_partition": -1, "source_offset": int(lines[1]), "table": None, "subject": None,
                            "classes": {}, "actions": {}, "unclassified": []}
    for name, value in want.items():
        if doc.get(name) != value:
            return f"its {name} is {doc.get(name)!r}, a checkpoint of chain {chain} has {value!r}"
    return None


@dataclass(frozen=True, slots=True)
class Observed:
    """One record as read: where it is, its ``bg-leaf`` header (None: absent), key and value."""

    topic: str
    partition: int
    offset: int
    header: bytes | None
    key: bytes | None
    value: bytes | None
    #: A deletion confirmation: its Ed25519 signature is checked too.
    confirmation: bool = False
    #: Why a record that poses as a checkpoint (``bg-checkpoint`` header) is not one its writer built
    #: (`checkpoint_record_problem`): it is then neither a checkpoint nor a leaf but a finding.
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Kept:
    """A kept checkpoint (signed note) and where it was found."""

    note: str
    where: str


@dataclass(frozen=True, slots=True)
class Break:
    kind: str
    chain: str | None
    seq: int | None
    where: str
    detail: str

    def line(self) -> str:
        at = "" if self.seq is None else f" seq {self.seq}"
        return f"{self.kind.upper()}: chain {self.chain or '-'}{at} at {self.where}: {self.detail}"


@dataclass
class ChainSummary:
    chain: str
    records: int
    checkpointed: int
    unanchored: int


@dataclass
class Report:
    breaks: list[Break] = field(default_factory=list)
    chains: list[ChainSummary] = field(default_factory=list)
    records: int = 0
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "checkpoints": self.checkpoints,
                "chains": len(self.chains), "unanchored": sum(c.unanchored for c in self.chains),
                "breaks": [{name: getattr(b, name) for name in ("kind", "chain", "seq", "where", "detail")}
                           for b in self.breaks]}


@dataclass(slots=True)
class _Leaf:
    rec: Observed
    seq: int
    prev: bytes
    hash: bytes
    index: int  # position in its stream


def _leaf(rec: Observed, index: int) -> tuple[str, _Leaf] | None:
    if rec.header is None:
        return None
    try:
        p = parse_prefix(rec.header)
    except (ValueError, UnicodeDecodeError):
        return None
    return p.chain, _Leaf(rec, p.seq, p.prev, merkle.leaf_hash(leaf_bytes(rec.header, rec.key, rec.value)), index)


def checkpoints_by_chain(kept: Iterable[Kept], verifier: Verifier,
                         breaks: list[Break]) -> dict[str, dict[int, list[tuple[Checkpoint, str]]]]:
    """Verified checkpoints per chain and size; a bad signature or origin becomes a break."""
    out: dict[str, dict[int, list[tuple[Checkpoint, str]]]] = defaultdict(lambda: defaultdict(list))
    for k in kept:
        try:
            cp = open_checkpoint(k.note, verifier)
        except ValueError as exc:
            claimed = k.note.split("\n", 1)[0]  # unverified: named only to say which chain it pretends to be of
            chain = claimed[len(ORIGIN_PREFIX):] if claimed.startswith(ORIGIN_PREFIX) else None
            breaks.append(Break("forged_checkpoint", chain, None, k.where, f"checkpoint rejected: {exc}"
                                + (" (it claims to be of this chain)" if chain else "")))
            continue
        if not cp.origin.startswith(ORIGIN_PREFIX):
            breaks.append(Break("forged_checkpoint", None, None, k.where, f"foreign origin {cp.origin!r}"))
            continue
        out[cp.origin[len(ORIGIN_PREFIX):]][cp.size].append((cp, k.where))
    return out


def chain_leaves(records: Iterable[Observed]) -> tuple[dict[str, list[_Leaf]], list[Observed]]:
    """The leaves of each chain in read order, and the records that carry no valid leaf header (or pose as
    a checkpoint they are not: `Observed.problem`)."""
    chains: dict[str, list[_Leaf]] = defaultdict(list)
    unchained: list[Observed] = []
    for i, rec in enumerate(records):
        got = None if rec.problem is not None else _leaf(rec, i)
        if got is None:
            unchained.append(rec)
        else:
            chains[got[0]].append(got[1])
    return chains, unchained


def verify(records: Iterable[Observed], kept: Iterable[Kept], verifier: Verifier, *,
           strict: bool = False, chains_filter: set[str] | None = None,
           topics: Mapping[str, str] | None = None) -> Report:
    """Verify every chain found in `records` or named by a checkpoint (optionally only `chains_filter`).

    `topics`: the topic read for each kind of chain (``{"audit": ..., "deletions": ...}``; a kind left out
    was not read). A writer puts a chain's records into its kind's topic only, and the leaf does not cover
    the topic, so a record found elsewhere is ``moved`` (not a leaf of its chain here); a chain named only
    by checkpoints is verified only if its kind's topic was read (the audit topic holds the checkpoints of
    the deletions chains too, so verifying it alone must not call those chains removed).
    """
    report = Report()
    records = list(records)
    report.records = len(records)
    kept = list(kept)
    report.checkpoints = len(kept)
    cps = checkpoints_by_chain(kept, verifier, report.breaks)
    chains, unchained = chain_leaves(records)
    for rec in unchained:
        if rec.problem is not None:
            report.breaks.append(Break("inserted", None, None, rec.where,
                                       f"a record with a bg-checkpoint header that is not the checkpoint record "
                                       f"its writer builds: {rec.problem} (a signed note copied into a forged "
                                       "record passes for a checkpoint only by its header)"))
    for rec in unchained:
        if rec.problem is None:
            report.breaks.append(Break("inserted", None, None, rec.where,
                                       "a record without a valid bg-leaf header"))
            break
    for rec in records:
        if rec.confirmation and rec.value is not None:
            try:
                doc = orjson.loads(rec.value)
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict) or not verify_confirmation(doc, verifier):
                report.breaks.append(Break("altered", None, None, rec.where,
                                           "a deletion confirmation whose signature does not verify"))
                break
    names = set(chains) | set(cps)
    if topics is not None:
        for name in list(chains):
            home = topics.get(_kind(name))
            stray = [leaf for leaf in chains[name] if leaf.rec.topic != home]
            if stray:
                first = min(stray, key=lambda leaf: leaf.seq)
                more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
                report.breaks.append(Break(
                    "moved", name, first.seq, first.rec.where,
                    f"a record of a {_kind(name)} chain in topic {first.rec.topic}{more}: its writer writes the "
                    "chain's records to " + (f"topic {home}" if home else f"the {_kind(name)} topic (not read here)")
                    + " only"))
                chains[name] = [leaf for leaf in chains[name] if leaf.rec.topic == home]
        names = {name for name, leaves in chains.items() if leaves} | {name for name in cps if _kind(name) in topics}
    if chains_filter is not None:
        names &= chains_filter
    moved = moved_leaves(chains)
    for name in sorted(names):
        brk, summary = _verify_chain(name, chains.get(name, []), cps.get(name, {}), strict, moved.get(name, []))
        report.chains.append(summary)
        if brk is not None:
            report.breaks.append(brk)
    return report


def moved_leaves(chains: dict[str, list[_Leaf]]) -> dict[str, list[Break]]:
    """Per chain, the records found in another partition than the other records with their key.

    Every writer leaves the partition of a chained record to the producer's partitioner, which puts all
    records with one key into one partition; a copy made with any key-based partitioner (or keeping the
    partitions) keeps that. So a record whose key's other records are all in another partition was moved
    there. The leaf does not cover the partition (a copy may have other partitions), hence this check.
    """
    where: dict[tuple[str, bytes], dict[int, list[tuple[str, _Leaf]]]] = defaultdict(lambda: defaultdict(list))
    for name, leaves in chains.items():
        for leaf in leaves:
            if leaf.rec.key is not None:
                where[(leaf.rec.topic, leaf.rec.key)][leaf.rec.partition].append((name, leaf))
    out: dict[str, list[Break]] = defaultdict(list)
    for parts in where.values():
        if len(parts) < 2:
            continue
        home = max(parts, key=lambda p: (len(parts[p]), -min(leaf.index for _, leaf in parts[p])))
        for partition, found in parts.items():
            if partition == home:
                continue
            for chain, leaf in found:
                out[chain].append(Break("moved", chain, leaf.seq, leaf.rec.where,
                                        f"the other {len(parts[home])} records with its key are in partition "
                                        f"{home}: records with one key stay in one partition, so it was moved"))
    return out


def _kind(chain: str) -> str:
    return chain.split("/", 1)[0]


def one_shot(chain: str) -> bool:
    """A chain of one short-lived writer (`guard erase`, `retention`, `hold --release`, one reveal call):
    ``<kind>/cli:<writer>/<random>``, checkpointed in the same write as its records."""
    parts = chain.split("/")
    return len(parts) == 3 and parts[1].startswith("cli:")


#: The middle of a worker's partition chain id: ``<raw topic>:<partition>`` (Kafka topic names use only
#: these characters, so no transactional id of a side chain containing another character is taken for one).
_PARTITION_CHAIN = re.compile(r"[A-Za-z0-9._-]+:[0-9]+")


def checkpointed_with_records(chain: str) -> bool:
    """A chain whose writer checkpoints, in the same write, every record it adds: one-shot chains and a
    worker's side chains (``<kind>/<transactional id>/<random>``, checkpointed in every transaction that
    writes to them: `guard.kafka.audit_chain.AuditChains.checkpoints`). A record of one after its last
    checkpoint was added later. Only a worker's partition chains (``<kind>/<topic>:<partition>/<random>``)
    are checkpointed every N records or T seconds and may legitimately end in unanchored records; an id of
    another shape (none is written) is given that benefit of the doubt too."""
    parts = chain.split("/")
    return len(parts) == 3 and (parts[1].startswith("cli:") or not _PARTITION_CHAIN.fullmatch(parts[1]))


def _verify_chain(name: str, leaves: list[_Leaf], cps: dict[int, list[tuple[Checkpoint, str]]],
                  strict: bool, moved: Sequence[Break] = ()) -> tuple[Break | None, ChainSummary]:
    specific: list[Break] = list(moved)
    # 1. forks: two checkpoints of one size with different roots
    for size, same_size in sorted(cps.items()):
        if len({cp.root for cp, _ in same_size}) > 1:
            specific.append(Break("fork", name, size, " and ".join(w for _, w in same_size[:2]),
                                  f"two checkpoints of size {size} with different roots"))
    # 2. one record per sequence number; the others were inserted
    by_seq: dict[int, list[_Leaf]] = defaultdict(list)
    for leaf in leaves:
        by_seq[leaf.seq].append(leaf)
    genuine: dict[int, _Leaf] = {}
    for seq in sorted(by_seq):
        group = by_seq[seq]
        if len(group) == 1:
            genuine[seq] = group[0]
            continue
        nexts = {leaf.prev for leaf in by_seq.get(seq + 1, [])}
        before = genuine.get(seq - 1)

        def score(leaf: _Leaf, nexts: set[bytes] = nexts, before: _Leaf | None = before) -> tuple[int, int]:
            links = (leaf.hash in nexts) + (before is not None and leaf.prev == before.hash)
            return (-links, leaf.index)

        ranked = sorted(group, key=score)
        genuine[seq] = ranked[0]
        for extra in ranked[1:]:
            same = " (a copy of it)" if extra.hash == ranked[0].hash else ""
            specific.append(Break("inserted", name, seq, extra.rec.where,
                                  f"a second record with sequence number {seq}{same}; the chain's own is at "
                                  f"{ranked[0].rec.where}"))
    # 3. order within each topic partition
    top: dict[tuple[str, int], _Leaf] = {}
    for leaf in sorted(genuine.values(), key=lambda x: x.index):
        stream = (leaf.rec.topic, leaf.rec.partition)
        last = top.get(stream)
        if last is not None and leaf.seq < last.seq:
            specific.append(Break("reordered", name, leaf.seq, leaf.rec.where,
                                  f"sequence number {leaf.seq} comes after {last.seq} ({last.rec.where})"))
        elif last is None or leaf.seq > last.seq:
            top[stream] = leaf
    # 4. gaps and truncation
    n = len(genuine)
    highest = max(genuine) + 1 if genuine else 0
    contiguous = next((s for s in range(highest) if s not in genuine), highest)
    if contiguous < highest:
        after = genuine.get(next(s for s in range(contiguous, highest) if s in genuine))
        before_leaf = genuine.get(contiguous - 1)
        specific.append(Break("removed", name, contiguous,
                              f"between {before_leaf.rec.where if before_leaf else 'the start'} and "
                              f"{after.rec.where if after else 'the end'}",
                              f"sequence number {contiguous} is missing"))
    kept_max = max(cps) if cps else 0
    if kept_max > highest:
        where = " and ".join(w for _, w in cps[kept_max][:2])
        if highest == 0:
            specific.append(Break("removed", name, 0, where,
                                  f"no record of the chain is left; a checkpoint says it had {kept_max}"))
        else:
            specific.append(Break("truncated", name, highest, where,
                                  f"the chain ends after {highest} records; a checkpoint says it had {kept_max}"))
    # 5. links
    for seq in range(min(contiguous, highest)):
        leaf = genuine[seq]
        want = ZERO_HASH if seq == 0 else genuine[seq - 1].hash
        if leaf.prev != want:
            culprit = genuine.get(seq - 1, leaf)
            specific.append(Break("altered", name, max(seq - 1, 0), culprit.rec.where,
                                  f"its leaf hash is not the one sequence number {seq} ({leaf.rec.where}) "
                                  "links to"))
            break
    # 6. roots against every checkpoint
    root_break: Break | None = None
    frontier = merkle.Frontier()
    good = 0
    sizes = sorted(s for s in cps if s <= contiguous)
    for size in sizes:
        while frontier.size < size:
            frontier.append(genuine[frontier.size].hash)
        got = frontier.root()
        bad = [w for cp, w in cps[size] if cp.root != got]
        if bad:
            root_break = Break("altered", name, good, bad[0],
                               f"the first {size} records do not hash to the checkpoint's root: a record with "
                               f"sequence number in [{good}, {size}) was altered")
            break
        good = size
    summary = ChainSummary(name, n, kept_max, max(0, highest - kept_max))
    if genuine and not cps:
        start = genuine[min(genuine)]
        specific.append(Break("inserted", name, start.seq, start.rec.where,
                              f"a chain of {n} records that no checkpoint (topic or second store) covers at all: "
                              "every writer checkpoints a chain in the write that starts it, so the guard did "
                              "not write it"))
    elif summary.unanchored and checkpointed_with_records(name):
        loose = genuine.get(kept_max)
        what = "one-shot" if one_shot(name) else "worker's side"
        specific.append(Break("inserted", name, kept_max, loose.rec.where if loose else "after the last checkpoint",
                              f"{summary.unanchored} records after the last checkpoint ({kept_max}) of a {what} "
                              "chain, whose writer checkpoints every record it writes in the same write: added "
                              "later"))
    elif strict and summary.unanchored:
        specific.append(Break("unanchored", name, kept_max, "after the last checkpoint",
                              f"{summary.unanchored} records no checkpoint covers yet"))
    if specific:
        return min(specific, key=lambda b: (b.seq if b.seq is not None else -1)), summary
    return root_break, summary


# ---- inclusion proofs ------------------------------------------------------------------------------
def prove(records: Iterable[Observed], kept: Iterable[Kept], verifier: Verifier, chain: str,
          seq: int) -> dict[str, Any]:
    """An RFC 6962 inclusion proof of record `seq` of `chain` against its largest verified checkpoint.

    ValueError if the chain does not verify up to that checkpoint or no checkpoint covers the record.
    """
    kept = list(kept)
    breaks: list[Break] = []
    cps = checkpoints_by_chain(kept, verifier, breaks).get(chain, {})
    leaves = {leaf.seq: leaf for leaf in chain_leaves(records)[0].get(chain, [])}
    covering = sorted(s for s in cps if s > seq)
    if not covering or seq not in leaves:
        raise ValueError(f"no checkpoint of chain {chain} covers sequence number {seq} yet")
    for size in reversed(covering):
        if all(s in leaves for s in range(size)):
            hashes = [leaves[s].hash for s in range(size)]
            cp, where = cps[size][0]
            if merkle.root(hashes) != cp.root:
                continue
            leaf = leaves[seq]
            proof = merkle.inclusion_proof(hashes, seq)
            note = next(k.note for k in kept_notes(kept, cp, verifier))
            return {"chain": chain, "seq": seq, "where": leaf.rec.where, "tree_size": size,
                    "leaf": leaf_bytes(leaf.rec.header or b"", leaf.rec.key, leaf.rec.value).hex(),
                    "leaf_hash": leaf.hash.hex(), "root": cp.root.hex(), "proof": [p.hex() for p in proof],
                    "checkpoint": note, "checkpoint_at": where, "verifier_key": f"{verifier.name}+{verifier.id.hex()}"}
    raise ValueError(f"chain {chain} does not verify up to any checkpoint covering sequence number {seq}")


def kept_notes(kept: Iterable[Kept], cp: Checkpoint, verifier: Verifier) -> Sequence[Kept]:
    out = []
    for k in kept:
        try:
            if open_checkpoint(k.note, verifier) == cp:
                out.append(k)
        except ValueError:
            continue
    return out
