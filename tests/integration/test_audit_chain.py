"""The audit trail proves itself (issue 14, item 5), on the real stack.

A worker writes audit records (and `guard erase` a deletion confirmation) into the test's own topics;
`guard audit verify` passes. Copies of the audit topic (made record by record, headers and all, by
`copy_topic`) are then tampered with: a record removed, one inserted, two swapped, one altered, the tail
cut; verify must fail on each and name the break. A worker SIGKILLed while its transaction is open and
restarted continues the same chains (aborted leaves never count). Idle checkpoints keep coming with no
traffic, and `guard audit prove`'s output is checked here with code of the test's own (RFC 6962 path
verification, the C2SP note signature with `cryptography`), not the guard's.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import random
import subprocess
import time
from collections import Counter, defaultdict

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.config import Settings
from guard.kafka.evidence import prepare_evidence_topics
from guard.kafka_security import stack_home
from tests.integration.kafka_helpers import GUARD, REPO, Rec, admin_kafka_settings, high_watermark, kafka_conf
from tests.integration.reliability_helpers import (
    SteadyProducer,
    create_topic,
    log_tail,
    read_from,
    unique,
    wait_until,
)
from tests.integration.test_crash_kills import OpenTransactions, _partitions
from tests.integration.test_reliability import Scenario, _log_dir

pytestmark = pytest.mark.integration

CHECKPOINT_S = 4
CHECKPOINT_RECORDS = 25


@pytest.fixture
def scenario(stack: dict[str, str], request: pytest.FixtureRequest):
    sc = Scenario(stack, _log_dir(request))
    sc.env = {**sc.env, "GUARD_AUDIT_CHECKPOINT_S": str(CHECKPOINT_S),
              "GUARD_AUDIT_CHECKPOINT_RECORDS": str(CHECKPOINT_RECORDS)}
    yield sc
    sc.kill_all()
    print(log_tail(*{w.log_path: w for w in sc.workers}.values(), chars=3000))


def guard_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARD, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def verify(sc: Scenario, *extra: str) -> subprocess.CompletedProcess[str]:
    return guard_cli(sc.env, "audit", "verify", "--audit-topic", sc.audit, "--deletions-topic", sc.deletions,
                     *extra)


def verify_copy(sc: Scenario, copy: str) -> subprocess.CompletedProcess[str]:
    """Verify a copy of the audit topic alone, against the second store's checkpoints of the original."""
    return guard_cli(sc.env, "audit", "verify", "--audit-topic", copy, "--deletions-topic", "",
                     "--store-topic", sc.audit)


def header(rec: Rec, name: str) -> bytes | None:
    return next((v for k, v in (rec.headers or []) if k == name), None)


def leaf_info(rec: Rec) -> tuple[str, int] | None:
    """(chain, seq) of a chained record, parsed by the test from the documented layout."""
    h = header(rec, "bg-leaf")
    if h is None:
        return None
    n = int.from_bytes(h[1:3], "big")
    return h[3:3 + n].decode(), int.from_bytes(h[3 + n:3 + n + 8], "big")


def copy_topic(bootstrap: str, records: list[Rec], partitions: int) -> str:
    """A new topic holding `records` in the given order, each in its partition, with key and headers."""
    topic = unique("audit-copy-")
    create_topic(bootstrap, topic, partitions)
    producer = Producer({**kafka_conf(bootstrap), "enable.idempotence": True})
    for rec in records:
        producer.produce(topic, rec.value, rec.key, partition=rec.partition, headers=rec.headers)
    assert producer.flush(60) == 0
    return topic


def _run_traffic(sc: Scenario, count: int) -> SteadyProducer:
    w = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=count, rate=100, partitions=sc.partitions).start()
    producer.join()
    sc.wait_decided(count, timeout=180)
    assert w.alive(), log_tail(w)
    return producer


def _checkpoints(sc: Scenario) -> list[Rec]:
    return [r for r in read_from(sc.bootstrap, sc.audit) if header(r, "bg-checkpoint") is not None]


# ---- RFC 6962 and C2SP, written again here so the proof is checked independently ---------------------
def _node(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


def _root_from_path(leaf_hash: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """Recompute the root from an audit path by walking RFC 6962's recursive split top-down."""
    def walk(lo: int, hi: int, path: list[bytes]) -> bytes:
        if hi - lo == 1:
            assert not path
            return leaf_hash
        k = 1
        while k * 2 < hi - lo:
            k *= 2
        if index < lo + k:
            return _node(walk(lo, lo + k, path[:-1]), path[-1])
        return _node(path[-1], walk(lo + k, hi, path[:-1]))
    return walk(0, size, path)


def _check_note(note: str, vkey: str) -> tuple[str, int, bytes]:
    name, key_id, b64 = vkey.strip().split("+", 2)
    public = base64.b64decode(b64)
    assert public[0] == 1 and hashlib.sha256(name.encode() + b"\n\x01" + public[1:]).digest()[:4].hex() == key_id
    text, sig_lines = note.split("\n\n", 1)
    line = sig_lines.strip().split("\n")[0]
    assert line.startswith(f"\u2014 {name} ")
    raw = base64.b64decode(line.rsplit(" ", 1)[1])
    assert raw[:4].hex() == key_id
    Ed25519PublicKey.from_public_bytes(public[1:]).verify(raw[4:], (text + "\n").encode())  # raises if forged
    origin, size, root = text.split("\n")[:3]
    return origin, int(size), base64.b64decode(root)


# ---- the tests ---------------------------------------------------------------------------------------------
def test_the_chain_verifies_proves_and_names_every_tampering(scenario: Scenario):
    sc = scenario
    producer = _run_traffic(sc, 400)
    # a deletion confirmation through `guard erase`: its own chains, checkpointed in the same write
    erased = guard_cli({**sc.env, **sc.output_env}, "erase", "--subject", str(producer.first_cid),
                       "--reason", "subject_request", "--by", "audit-test")
    assert erased.returncode == 0, erased.stderr[-3000:]
    confirmation = orjson.loads(erased.stdout)
    assert confirmation["signature"]["alg"] == "ed25519"

    # every chain verifies, the deletion chain and its signed confirmation included
    wait_until(lambda: verify(sc).returncode == 0, timeout=60, interval=2, what="verify to pass")
    ok = verify(sc, "--json")
    report = orjson.loads(ok.stdout)
    assert report["ok"] and report["breaks"] == [], ok.stdout
    # least privilege: as `oncall`, verify reads the evidence topics but the test's own topics are refused
    oncall = {**sc.env, "GUARD_KAFKA_USERNAME": "oncall", "GUARD_KAFKA_PASSWORD_FILE":
              str(stack_home() / "secrets" / "kafka-oncall.password")}
    refused = guard_cli(oncall, "audit", "verify", "--audit-topic", sc.audit, "--deletions-topic", sc.deletions)
    assert refused.returncode != 0 and "oncall may not describe it" in refused.stderr, refused.stderr[-2000:]
    prepare_evidence_topics(AdminClient(kafka_conf(sc.bootstrap)),
                            Settings(**admin_kafka_settings(), kafka_bootstrap=sc.bootstrap), 1)
    # (records from now on: none; a store topic of its own, since other tests' checkpoints of guard.audit
    # in the second store would name the records before --since-ms as removed)
    evidence = guard_cli(oncall, "audit", "verify", "--since-ms", str(int(time.time() * 1000) + 60_000),
                         "--store-topic", unique("no-checkpoints-"))
    assert evidence.returncode == 0 and "OK" in evidence.stdout, evidence.stderr[-2000:]

    audit = read_from(sc.bootstrap, sc.audit)
    chains = Counter(info[0] for r in audit if (info := leaf_info(r)) is not None)
    per_partition = [c for c in chains if c.startswith(f"audit/{sc.topic}:")]
    assert len(per_partition) == sc.partitions, chains  # one chain per input partition
    assert sum(chains[c] for c in per_partition) >= 400
    deletions = read_from(sc.bootstrap, sc.deletions)
    assert any((info := leaf_info(r)) and info[0].startswith("deletions/cli:audit-test/") for r in deletions)

    # idle checkpoints: with no traffic, every chain of the worker is checkpointed again every T seconds
    started = time.time()

    def fresh_stamps() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {c: [] for c in per_partition}
        for r in _checkpoints(sc):
            chain_id = (header(r, "bg-checkpoint") or b"").decode()
            if chain_id in out and r.timestamp / 1000 >= started:
                out[chain_id].append(r.timestamp)
        return out if all(len(v) >= 2 for v in out.values()) else {}

    stamps = wait_until(fresh_stamps, timeout=CHECKPOINT_S * 4 + 40, interval=1,
                        what="two idle checkpoints of every chain")
    for chain_id, times in stamps.items():
        times.sort()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # T, plus the worker's check period and a margin for this slow shared machine
        assert all(g <= (CHECKPOINT_S + 15) * 1000 for g in gaps), (chain_id, gaps)

    # an inclusion proof, checked with the test's own code
    target = random.choice([r for r in audit if (info := leaf_info(r)) and info[0] in per_partition])
    proved = guard_cli(sc.env, "audit", "prove", "--audit-topic", sc.audit, "--deletions-topic", sc.deletions,
                       "--at", f"{sc.audit}:{target.partition}:{target.offset}")
    assert proved.returncode == 0, proved.stderr[-2000:]
    proof = orjson.loads(proved.stdout)
    leaf = bytes.fromhex(proof["leaf"])
    h = header(target, "bg-leaf")
    assert h is not None and leaf.startswith(h) and leaf.endswith(target.value or b"")
    assert (target.key or b"") in leaf
    vkey = (stack_home() / "secrets" / "audit-signing.pub").read_text()  # the default home too (make test)
    origin, size, root = _check_note(proof["checkpoint"], vkey)
    assert origin.endswith(leaf_info(target)[0]) and size == proof["tree_size"]  # type: ignore[index]
    seq = leaf_info(target)[1]  # type: ignore[index]
    assert _root_from_path(hashlib.sha256(b"\x00" + leaf).digest(), seq, size,
                           [bytes.fromhex(p) for p in proof["proof"]]) == root

    # tampering, each on a fresh copy of the audit topic
    by_part: dict[int, list[Rec]] = defaultdict(list)
    for r in audit:
        by_part[r.partition].append(r)
    chain = max(per_partition, key=lambda c: chains[c])
    part = next(p for p, rs in by_part.items() if any((i := leaf_info(r)) and i[0] == chain for r in rs))
    rs = by_part[part]
    idx = [i for i, r in enumerate(rs) if (info := leaf_info(r)) and info[0] == chain]
    mid = idx[len(idx) // 3]
    nxt = idx[len(idx) // 3 + 1]

    def copy_with(records_of_part: list[Rec]) -> str:
        records = [r for p in sorted(by_part) for r in (records_of_part if p == part else by_part[p])]
        return copy_topic(sc.bootstrap, records, sc.partitions)

    intact = copy_with(rs)
    assert verify_copy(sc, intact).returncode == 0, verify_copy(sc, intact).stdout
    # the documented copy (`guard audit copy`) verifies too, and `guard audit show` reads it
    documented = unique("audit-copy-")
    copied = guard_cli(sc.env, "audit", "copy", "--from", sc.audit, "--to", documented)
    assert copied.returncode == 0 and "copied" in copied.stdout, copied.stderr[-2000:]
    assert verify_copy(sc, documented).returncode == 0, verify_copy(sc, documented).stdout
    shown = guard_cli(sc.env, "audit", "show", "--audit-topic", documented, "--json")
    leaves = [r for r in audit if header(r, "bg-checkpoint") is None]  # (since then: idle checkpoints only)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert len(shown.stdout.splitlines()) == len(leaves), shown.stderr[-2000:]
    seq_mid = leaf_info(rs[mid])[1]  # type: ignore[index]
    altered = list(rs)
    value = bytearray(altered[mid].value or b"")
    value[-1] ^= 0x01
    altered[mid] = dataclasses.replace(rs[mid], value=bytes(value))
    cases = {
        "REMOVED": [r for i, r in enumerate(rs) if i != mid],
        "INSERTED": [*rs[:nxt + 1], rs[mid], *rs[nxt + 1:]],
        "REORDERED": [*rs[:mid], rs[nxt], *rs[mid + 1:nxt], rs[mid], *rs[nxt + 1:]],
        "ALTERED": altered,
        "TRUNCATED": rs[:idx[len(idx) // 2]],
    }
    other = (part + 1) % sc.partitions
    moved = [r for p in sorted(by_part) for r in by_part[p] if r is not rs[mid]]
    copies = {kind: copy_with(records) for kind, records in cases.items()}
    copies["MOVED"] = copy_topic(sc.bootstrap, [*moved, dataclasses.replace(rs[mid], partition=other)],
                                 sc.partitions)
    for kind, copy in copies.items():
        result = verify_copy(sc, copy)
        assert result.returncode == 1, f"{kind}: verify passed a tampered copy\n{result.stdout}"
        first = next((line for line in result.stdout.splitlines() if f": chain {chain} " in line), "")
        assert first.startswith(f"{kind}: chain {chain}"), f"{kind} expected, got: {result.stdout}"
        if kind in ("REMOVED", "ALTERED", "REORDERED", "MOVED"):
            assert f"seq {seq_mid} " in first, first
        print(f"{kind}: {first}")


def test_a_worker_killed_mid_transaction_continues_its_chains(scenario: Scenario):
    sc = scenario
    sc.env = {**sc.env, "GUARD_TRANSACTION_TIMEOUT_MS": "60000"}
    count = 2400  # 30 s at 80/s: still flowing through three attempts
    w1 = sc.worker(1).start()
    producer = SteadyProducer(sc.bootstrap, sc.topic, count=count, rate=80, partitions=sc.partitions).start()
    sc.wait_decided(40, timeout=90)
    probe = OpenTransactions(sc.bootstrap, _partitions(sc.bootstrap, [sc.audit]))
    try:
        witnessed: dict[tuple[str, int], tuple[int, int]] = {}
        worker = w1
        for _ in range(3):
            time.sleep(random.uniform(0.2, 2.0))
            deadline = time.monotonic() + 30
            while not probe.now():
                assert time.monotonic() < deadline, "no open transaction seen in 30 s"
            worker.kill()
            time.sleep(2)
            witnessed = probe.now()
            worker = sc.worker(1).start()
            if witnessed:
                break
        assert witnessed, "the kill never met an open transaction"
    finally:
        probe.close()
    # The successor decides inputs of its own before the stream ends (sized to flow through three attempts).
    sc.wait_decided(min(sc.decided() + 40, producer.sent), timeout=120)
    sent = producer.finish()
    producer.join()
    sc.wait_decided(sent, timeout=240)
    sc.stop_all()
    # --strict: a record no checkpoint covers is a break. A clean stop checkpoints every chain that grew.
    result = verify(sc, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    committed = read_from(sc.bootstrap, sc.audit)
    chains = Counter(info[0] for r in committed if (info := leaf_info(r)) is not None)
    per_partition = {c for c in chains if c.startswith(f"audit/{sc.topic}:")}
    # the restarted worker continued the same chain of each input partition: no new chain began
    assert len(per_partition) == sc.partitions, chains
    # the dead worker's aborted records carried sequence numbers the successor took again: they are in
    # the log (read_uncommitted) but in no tree (read_committed, verify passed)
    seen = _read_uncommitted(sc.bootstrap, sc.audit)
    dup = Counter(info for r in seen if (info := leaf_info(r)) is not None and info[0] in per_partition)
    assert any(n > 1 for n in dup.values()), "the aborted transaction's leaves were expected in the raw log"
    assert all(n == 1 for n in Counter(leaf_info(r) for r in committed if leaf_info(r)).values())


def _read_uncommitted(bootstrap: str, topic: str) -> list[Rec]:
    c = Consumer({**kafka_conf(bootstrap), "group.id": unique("audit-ru-"),
                  "isolation.level": "read_uncommitted", "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: high_watermark(c, topic, p) for p in meta.partitions}
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Rec] = []
        deadline = time.monotonic() + 60
        while sum(1 for _ in out) < sum(ends.values()) and time.monotonic() < deadline:
            for msg in c.consume(2000, 0.5):
                if msg.error() is None:
                    out.append(Rec(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                   msg.headers(), msg.timestamp()[1]))
            pos = c.position([TopicPartition(topic, p) for p in meta.partitions])
            if all(tp.offset >= ends[tp.partition] for tp in pos):
                break
        return out
    finally:
        c.close()

