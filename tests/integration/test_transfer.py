"""A branch transfer end to end on the real stack (issue 19, items 2-4; docs/transfer.md).

Both branches take writes through real workers (0101 on PostgreSQL, 0202 on MariaDB, through Debezium);
the reveal service runs as a process; `guard transfer start | cutover | complete | report` run as the
command line does. Branch 0101 goes from bank-a to bank-b: the former owner's staff write and reveal after
the cut-off and are denied (and reported); the new owner's staff reveal moved customers' records written
before the cut-over (the data keys were re-wrapped, nothing re-encrypted) and are denied destroyed and
storage-only ones; the cut-over is SIGKILLed in the middle of its shreds and rerun: same end state, one
confirmation per out-of-scope customer; branch 0202 is not affected.

Isolation: a tenant of its own (the Redis admin user: the guard's user may touch the stack's tenants only),
topics of its own (audit, anomalies, deletions, DLQ, sanitized prefix) and a copy of the policy directory,
so the shared stack's branch 0101 is not transferred for the tests after this one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from guard.config import load_settings
from guard.keys.store import RedisKeyStore
from guard.pipeline.runtime import build_keys
from guard.policy.engine import default_directory
from guard.policy.sources import staff_entities
from guard.records.codec import decode, write_decision_of
from guard.reveal.client import Ref, RevealClient
from guard.reveal.tokens import TokenStore, load_token_key
from guard.workload.branch import run_workload
from tests.integration.kafka_helpers import GUARD, REPO, GuardProcess, Rec, admin_redis_env, read_all, wait_for

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
TENANT = f"tr{RUN}"
PREFIX = f"tr{RUN}"
OLD, NEW, M0202 = f"old-m-{RUN}", f"new-m-{RUN}", f"m0202-{RUN}"
CUSTOMERS_0101 = f"sanitized.{PREFIX}.br0101.public.customers"
CUSTOMERS_0202 = f"sanitized.{PREFIX}.br0202.branch_0202.customers"
DELETIONS = f"guard.deletions.{PREFIX}"
AUDIT = f"guard.audit.{PREFIX}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _guard(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _latest(bootstrap: str, topic: str, ids: set[int], *, after: int = -1) -> dict[int, Rec]:
    """The latest record of each customer of `ids` on `topic` (offset above `after`), once all are there."""
    def key(r: Rec) -> int | None:
        return orjson.loads(r.key).get("customer_id") if r.key and r.value else None

    recs = wait_for(bootstrap, topic, lambda rs: ids <= {key(r) for r in rs if r.offset > after}, timeout=240)
    return {key(r): r for r in recs if key(r) in ids and r.offset > after}  # type: ignore[misc]


def _write(dsn: str, principal: str, cid: int, mobile: str) -> None:
    """A write by `principal` (the attribution contract: the transaction names it first)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('guard.principal', %s, true)", (principal,))
        conn.execute("UPDATE customers SET mobile = %s WHERE customer_id = %s", (mobile, cid))


def _reveal(client: RevealClient, rec: Rec, fields: list[str]) -> dict[str, Any]:
    return dict(client.reveal("kyc_review", [Ref(rec.topic, rec.partition, rec.offset, fields)]).results[0])


@pytest.fixture
def world(stack: dict[str, str], tmp_path: Path):
    policy = tmp_path / "policy"
    shutil.copytree(default_directory(), policy)
    docs = json.loads((policy / "entities.json").read_text())
    staff = staff_entities([(s, "0101", "bank-a", True, ["teller"]) for s in ("t0101-01", "t0101-02")]
                           + [("m0101-01", "0101", "bank-a", True, ["manager"]),
                              (OLD, "0101", "bank-a", True, ["manager"]), (M0202, "0202", "bank-a", True, ["manager"])])
    if not any(d["uid"]["id"] == "0202" and d["uid"]["type"].endswith("Branch") for d in docs):
        docs.append({"uid": {"type": "BranchGuard::Branch", "id": "0202"},
                     "attrs": {"code": "0202", "transfer_state": "active",
                               "owner": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-a"}}},
                     "parents": [{"type": "BranchGuard::Organisation", "id": "bank-a"}]})
    (policy / "entities.json").write_text(json.dumps(docs + staff))
    env = {**admin_redis_env(stack), "GUARD_TENANT": TENANT, "GUARD_POLICY_DIR": str(policy),
           "GUARD_POLICY_STAFF": "file", "GUARD_AUDIT_TOPIC": AUDIT,
           "GUARD_ANOMALIES_TOPIC": f"guard.anomalies.{PREFIX}",
           "GUARD_DELETIONS_TOPIC": DELETIONS, "GUARD_DLQ_TOPIC": f"guard.dlq.{PREFIX}",
           "GUARD_SANITIZED_PREFIX": f"sanitized.{PREFIX}.", "GUARD_TRANSFER_DESTROY_BATCH": "1",
           "GUARD_ATTRIBUTION_WAIT_S": "5"}
    full = {**os.environ, **stack, **env}
    w1 = GuardProcess(stack, worker_id=f"tr{RUN}-0101", group_id=f"tr-{RUN}-0101", log_dir=tmp_path, extra_env=env)
    w2 = GuardProcess(stack, worker_id=f"tr{RUN}-0202", group_id=f"tr-{RUN}-0202", log_dir=tmp_path,
                      extra_env={**env, "GUARD_BRANCH": "0202", "GUARD_RAW_TOPIC_PREFIX": "br0202"})
    w1.start(from_end=True)
    w2.start(from_end=True)
    token_key = tmp_path / "reveal-token.key"
    load_token_key(token_key, create=True)
    port = _free_port()
    reveal_env = {**full, "GUARD_REVEAL_TOKEN_KEY_FILE": str(token_key)}
    log = (tmp_path / "reveal.log").open("wb")
    reveal = subprocess.Popen([*GUARD, "reveal", "serve", "--port", str(port), "--policy", str(policy)], cwd=REPO,
                              env=reveal_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    settings = dataclasses.replace(load_settings(), tenant=TENANT, redis_url=env["GUARD_REDIS_URL"],
                                   redis_password_file=env["GUARD_REDIS_PASSWORD_FILE"])
    try:
        yield {"stack": stack, "env": full, "policy": policy, "tmp": tmp_path, "settings": settings,
               "url": f"http://127.0.0.1:{port}", "reveal": reveal, "token_key": token_key, "workers": (w1, w2)}
    finally:
        for proc in (w1, w2):
            proc.stop()
        reveal.terminate()
        try:
            reveal.wait(30)
        except subprocess.TimeoutExpired:
            reveal.kill()
        print((tmp_path / "reveal.log").read_text(errors="replace")[-2000:])
        for proc in (w1, w2):
            print(proc.log()[-2000:])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the reveal service exited"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the reveal service did not answer in 120 s"
        time.sleep(0.5)


def test_branch_0101_is_transferred_while_both_branches_take_writes(world: dict[str, Any]) -> None:
    began = time.monotonic()
    stack, env, settings = world["stack"], world["env"], world["settings"]
    bootstrap, dsn = stack["GUARD_KAFKA_BOOTSTRAP"], stack["GUARD_BRANCH_DSN"]
    # --- both branches take a small workload -------------------------------------------------------------
    w1 = run_workload(dsn, customers=16, update=0, delete=0, seed=int(RUN, 16))
    w2 = run_workload(stack["GUARD_BRANCH2_DSN"], customers=4, update=0, delete=0, branch_code="0202")
    ids = w1.customers
    moved, destroyed, held = ids[:6], ids[6:14], ids[14:16]
    before = _latest(bootstrap, CUSTOMERS_0101, set(ids))
    before_0202 = _latest(bootstrap, CUSTOMERS_0202, set(w2.customers))
    keys = build_keys(settings, listen=False)
    store: RedisKeyStore = keys.store
    kek_0202 = store.kek_versions("0202")
    store_tokens = TokenStore(store, load_token_key(world["token_key"]))
    _wait_healthy(world["url"], world["reveal"])
    old, new, m0202 = (RevealClient(world["url"], store_tokens.create(f"Staff::{who}")[0]) for who in (OLD, NEW, M0202))
    assert _reveal(old, before[moved[0]], ["name"])["decision"] == "allowed"  # the owner's manager, before

    # --- start: the plan recorded, the branch transferring from the cut-off ----------------------------------
    cutoff = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    plan = world["tmp"] / "plan.toml"
    plan.write_text(f"""
[transfer]
id = "t-{RUN}"
branch = "0101"
from = "bank-a"
to = "bank-b"
cutoff = "{cutoff.strftime('%Y-%m-%dT%H:%M:%SZ')}"
by = "dpo@bank-a"

[scope]
default = "move"
move = {moved}
destroy = {destroyed}
destroy_reason = "art47_1_purpose_achieved"

[[scope.retain]]
customers = {held}
legal_basis = "AML Law Art. 19: customer identity and transaction records kept 5 years"
until = "2031-12-31T00:00:00Z"

[[incoming_staff]]
id = "{NEW}"
roles = ["manager"]
""")
    checked = _guard(env, "transfer", "plan", str(plan))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["destroy"] == 8
    started = _guard(env, "transfer", "start", str(plan))
    assert started.returncode == 0, started.stderr
    assert _guard(env, "transfer", "start", str(plan)).returncode == 0  # idempotent
    time.sleep(2)  # the workers' and the reveal service's engines reload the entities within a second
    while datetime.now(UTC) < cutoff + timedelta(seconds=1):
        time.sleep(0.2)
    # --- former staff after the cut-off, before the cut-over (the freeze) -------------------------------------
    _write(dsn, f"Staff:{OLD}", moved[1], "13900000001")
    frozen = _reveal(old, before[moved[0]], ["name"])
    assert frozen["decision"] == "denied" and "freeze-between-cutoff-and-cutover" in frozen["policies"]

    # --- the cut-over, SIGKILLed in the middle of its shreds, then rerun ------------------------------------
    state_key = store.name("transfer", f"t-{RUN}")

    def state() -> dict[str, Any]:
        raw = store.client.get(state_key)
        return orjson.loads(raw) if raw else {}

    killed_log = world["tmp"] / "cutover-killed.log"
    with killed_log.open("wb") as log:
        proc = subprocess.Popen([*GUARD, "transfer", "cutover", str(plan)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(state().get("destroyed") or {}) < 2:
        assert proc.poll() is None, f"the cut-over ended before it could be killed: {killed_log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the cut-over shredded nothing in 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    mid = state()
    assert mid["phase"] == "cutting_over" and "destroy" not in mid["steps"]
    assert 2 <= len(mid["destroyed"]) < 8
    rerun = _guard(env, "transfer", "cutover", str(plan))
    assert rerun.returncode == 0, rerun.stderr
    done = state()
    assert done["phase"] == "cut_over" and len(done["destroyed"]) == 8
    # installed, so no copy of the incoming key stays in the state; the key store keeps no customer ids
    assert "prepared_kek" not in done
    kept = done["plan"]["scope"]
    assert (kept["move_named"], kept["destroy_named"], [r["customers_named"] for r in kept["retain"]]) == (6, 8, [2])
    assert not {"move", "destroy"} & set(kept) and not any("customers" in r for r in kept["retain"])
    assert _guard(env, "transfer", "cutover", str(plan)).returncode == 0  # a third run has nothing to do
    time.sleep(1.5)  # the entities' reload (within a second)

    # --- the key store: the incoming key current, the outgoing one gone, data keys re-wrapped ----------------
    current, versions = store.kek_versions("0101")
    assert current == done["kek"]["incoming_version"] and set(versions) == {current}
    tokens = {cid: keys.subject_token("0101", cid) for cid in ids}
    for cid in moved + held:
        fields = store.dek_fields("0101", tokens[cid])
        assert fields and {keys.kek_version_of(w) for w in fields.values()} == {current}, cid
    assert set(store.erased_among("0101", [tokens[c] for c in destroyed])) == {tokens[c] for c in destroyed}
    assert all(store.is_storage_only("0101", tokens[c]) for c in held)

    # --- after the cut-over: former staff denied, new staff see what moved ----------------------------------
    _write(dsn, f"Staff:{OLD}", moved[2], "13900000002")
    denied = _reveal(old, before[moved[0]], ["name"])
    assert denied["decision"] == "denied" and "nobody-outside-owner-after-cutoff" in denied["policies"]
    with psycopg.connect(dsn) as conn:
        name = conn.execute("SELECT name FROM customers WHERE customer_id = %s", (moved[0],)).fetchone()[0]
    seen = _reveal(new, before[moved[0]], ["name"])  # a record sealed before the cut-over
    assert seen["decision"] == "allowed" and seen["fields"]["name"] == name
    gone = _reveal(new, before[destroyed[0]], ["name"])
    assert gone["decision"] == "denied" and gone["reason"] == "erased"
    kept = _reveal(new, before[held[0]], ["name"])
    assert kept["decision"] == "denied" and kept["reason"] == "restricted"
    # a write after the cut-over is sealed under the new owner's hierarchy and opens for the new owner
    _write(dsn, f"Staff:{NEW}", moved[3], "13900000003")
    after = _latest(bootstrap, CUSTOMERS_0101, {moved[3]}, after=before[moved[3]].offset)[moved[3]]
    fresh = _reveal(new, after, ["mobile"])
    assert fresh["decision"] == "allowed" and fresh["fields"]["mobile"] == "13900000003"
    # a customer the new owner opens after the cut-over gets a data key wrapped under the new owner's key
    opened = run_workload(dsn, customers=1, update=0, delete=0, opener=f"Staff:{NEW}").customers[0]
    _latest(bootstrap, CUSTOMERS_0101, {opened})
    wrapped = store.dek_fields("0101", keys.subject_token("0101", opened))
    assert wrapped and {keys.kek_version_of(w) for w in wrapped.values()} == {current}

    # the former staff's two writes are decided (write_denied) by the worker before the transfer closes
    def denied_writes(recs: list[Rec]) -> int:
        docs = [decode(r.value) for r in recs if r.value and not dict(r.headers or []).get("bg-checkpoint")]
        return sum(1 for d in docs if (w := write_decision_of(d)) is not None and w[0] == "write_denied"
                   and w[1].get("principal") == f"Staff:{OLD}")

    wait_for(bootstrap, AUDIT, lambda rs: denied_writes(rs) >= 2, timeout=180)

    # --- complete and report ---------------------------------------------------------------------------------
    completed = _guard(env, "transfer", "complete", str(plan))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert json.loads(completed.stdout)["verification"]["ok"] is True
    out = [world["tmp"] / f"r{i}" for i in (1, 2)]
    for o in out:
        made = _guard(env, "transfer", "report", str(plan), "--json", str(o.with_suffix(".json")),
                      "--html", str(o.with_suffix(".html")))
        assert made.returncode == 0, made.stderr
    assert out[0].with_suffix(".json").read_bytes() == out[1].with_suffix(".json").read_bytes()
    assert out[0].with_suffix(".html").read_bytes() == out[1].with_suffix(".html").read_bytes()
    report = json.loads(out[0].with_suffix(".json").read_text())
    counts = report["counts"]
    assert (counts["moved"] >= 6, counts["destroyed"], counts["held_storage_only"]) == (True, 8, 2)
    assert counts["destroy_outcomes"] == {"shredded": 8} and counts["held_by_legal_hold"] == 0
    assert counts["named_by_plan_not_in_database"] == {"destroy": 0, "move": 0, "retain": 0}
    assert counts["confirmations_on_topic"] == 8 and counts["confirmations_written_twice"] == []
    # the deletions topic itself: one confirmation per out-of-scope customer, none twice, none missed
    confirmations = [orjson.loads(r.value) for r in read_all(bootstrap, DELETIONS, timeout=30) if r.value]
    ours = [c for c in confirmations if c.get("trigger") == "transfer"]
    assert sorted(c["subject"] for c in ours) == sorted(tokens[c] for c in destroyed)
    assert len({c["id"] for c in ours}) == 8
    attempts = report["access_after_cutoff"]["attempts"]
    mine = [a for a in attempts if a["principal"] == f"Staff:{OLD}"]
    assert {a["decision"] for a in mine} >= {"write_denied", "reveal_denied"} and len(mine) >= 4
    assert report["access_after_cutoff"]["allowed"] == 0
    assert report["verification"]["ok"] and report["verification"]["transfer_chains"]
    assert any(a["rule"] == "write_denied" and a["principal"] == f"Staff:{OLD}" for a in report["anomalies"])
    status = _guard(env, "transfer", "status", str(plan))
    assert status.returncode == 0 and json.loads(status.stdout)["phase"] == "completed"
    assert "Staff:" + OLD in out[0].with_suffix(".html").read_text()

    # --- branch 0202: not affected ---------------------------------------------------------------------------
    assert store.kek_versions("0202") == kek_0202
    assert store.erased_among("0202", [keys.subject_token("0202", c) for c in w2.customers]) == []
    assert _reveal(m0202, before_0202[w2.customers[0]], ["name"])["decision"] == "allowed"
    more = run_workload(stack["GUARD_BRANCH2_DSN"], customers=1, update=0, delete=0, branch_code="0202")
    _latest(bootstrap, CUSTOMERS_0202, set(more.customers))
    print(f"transfer test took {time.monotonic() - began:.0f} s")


def test_the_key_handover_refuses_stale_branch_keys_and_keeps_data_keys(stack: dict[str, str]) -> None:
    """The key store's part of the cut-over, on the real Redis (no Kafka): a process whose cached branch key a
    transfer retires can't wrap a new data key under it; re-wrapping keeps every data key, so what was
    sealed before opens afterwards; the outgoing versions are deleted; one handover per branch at a time."""
    env = admin_redis_env(stack)
    settings = dataclasses.replace(load_settings(), tenant=f"trk{RUN}", redis_url=env["GUARD_REDIS_URL"],
                                   redis_password_file=env["GUARD_REDIS_PASSWORD_FILE"])
    stale, operator = build_keys(settings, listen=False), build_keys(settings, listen=False)
    stale_batch = build_keys(settings, listen=False)  # another writer, which creates keys a batch at a time
    branch = "0909"
    sealed = stale.subject_aead(branch, "s1").seal(b"before the cut-over", b"ad")  # caches branch key v1
    stale_batch.subject_aead(branch, "s0")  # caches branch key v1 too
    prepared = operator.prepare_transfer_key(branch, "t1")
    assert operator.install_transfer_key(branch, "t1", prepared) == 2
    assert operator.install_transfer_key(branch, "t1", prepared) == 2  # a rerun: the same version
    with pytest.raises(Exception, match="another transfer"):
        operator.install_transfer_key(branch, "t2", operator.prepare_transfer_key(branch, "t2"))
    stale.subject_aead(branch, "s2")  # the floor refuses its cached v1: it re-reads the branch key
    assert {stale.kek_version_of(w) for w in stale.store.dek_fields(branch, "s2").values()} == {2}
    stale_batch.prefetch(branch, {"s0", "s3", "s4"})  # the floor refuses the whole batch: re-read, re-wrapped
    assert {stale.kek_version_of(w) for s in ("s3", "s4") for w in stale.store.dek_fields(branch, s).values()} == {2}
    assert operator.rewrap_subject(branch, "s1") == (1, "rewrapped")
    assert operator.rewrap_subject(branch, "s1") == (0, "current")
    assert operator.retire_transfer_keys(branch) == 1
    assert set(operator.store.kek_versions(branch)[1]) == {2}
    fresh = build_keys(settings, listen=False)
    assert fresh.subject_aead_for(branch, "s1", sealed).open(sealed, b"ad") == b"before the cut-over"
    operator.store.end_kek_handover(branch, "t1")
    assert operator.store.kek_handover(branch) == (2, None)
