"""The transfer's service steps (`start`, `cutover`, `complete`) with doubles for the key store, the key
manager and Kafka: what each step refuses, what it leaves in the state and in its audit records. No stack:
the state lives in the in-memory Redis double of test_transfer.py, the policy directory is a copy of the
repository's own."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from guard.config import Settings
from guard.errors import GuardError
from guard.policy.engine import default_directory
from guard.transfer import entities
from guard.transfer import state as sm
from guard.transfer.plan import parse_plan
from guard.transfer.service import TransferService
from tests.unit.test_transfer import VALID, FakeRedis

PLAN = parse_plan(VALID, digest="d1")
AFTER_CUTOFF_S = PLAN.cutoff_ms / 1000 + 1


class FakeKeys:
    """The key manager's part the steps call: the incoming key is opaque bytes, tokens are `tok-<id>`."""

    def __init__(self) -> None:
        self.installed: list[bytes] = []

    def prepare_transfer_key(self, branch: str, transfer_id: str) -> bytes:
        return b"incoming key wrapped by the master key"

    def install_transfer_key(self, branch: str, transfer_id: str, prepared: bytes) -> int:
        self.installed.append(prepared)
        return 2

    def subject_token(self, branch: str, customer_id: int) -> str:
        return f"tok-{customer_id}"


class FakeStore:
    """The key store's part the steps call: every out-of-scope subject erased, nothing pending."""

    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.handover_ended = False

    def name(self, *parts: str) -> str:
        return "bg:t:" + ":".join(parts)

    def kek_versions(self, branch: str) -> tuple[int, dict[int, bytes]]:
        return 1, {1: b"outgoing"}

    def kek_handover(self, branch: str) -> tuple[int, str | None]:
        return 2, f"{PLAN.id} 2"

    def dek_subjects(self, branch: str) -> list[str]:
        return []

    def erased_among(self, branch: str, subjects: list[str]) -> list[str]:
        return list(subjects)

    def pending_confirmations(self, branch: str) -> dict[str, bytes]:
        return {}

    def end_kek_handover(self, branch: str, transfer_id: str) -> None:
        self.handover_ended = True


class FakePublisher:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def publish(self, records: list[Any]) -> None:
        self.records += records

    def decisions(self) -> list[str]:
        return [r.decision for r in self.records]

    def detail(self, decision: str) -> dict[str, Any]:
        return next(orjson.loads(r.reason) for r in self.records if r.decision == decision)


class FakeEmitter:
    def audit(self, source: str, partition: int, offset: int, table: Any, op: str, subject: Any, decision: str,
              reason: str, *_: Any) -> SimpleNamespace:
        return SimpleNamespace(decision=decision, reason=reason, subject=subject, key=None)


@dataclasses.dataclass
class World:
    service: TransferService
    redis: FakeRedis
    store: FakeStore
    keys: FakeKeys
    published: FakePublisher
    policy: Path

    def state(self) -> dict[str, Any]:
        raw = self.redis.data[self.store.name("transfer", PLAN.id)]
        return dict(orjson.loads(raw))


@pytest.fixture
def world(tmp_path: Path) -> World:
    policy = tmp_path / "policy"
    shutil.copytree(default_directory(), policy)
    redis = FakeRedis()
    store, keys, published = FakeStore(redis), FakeKeys(), FakePublisher()
    service = TransferService.__new__(TransferService)  # the doubles instead of Redis, Kafka and the KMS
    service.plan = PLAN
    service.settings = dataclasses.replace(Settings(), branch=PLAN.branch, policy_staff="file")
    service.policy_dir = policy
    service.customer_ids = lambda: [1, 5, 10]
    service.clock = lambda: AFTER_CUTOFF_S
    service.sanitizer = SimpleNamespace(emitter=FakeEmitter())  # type: ignore[assignment]
    service.keys = keys  # type: ignore[assignment]
    service.store = store  # type: ignore[assignment]
    service.states = sm.StateStore(redis, store.name)
    service._publisher = published  # type: ignore[assignment]
    service._seq = 0
    return World(service, redis, store, keys, published, policy)


def cut_over(w: World) -> dict[str, Any]:
    """`start`, then every cut-over step recorded done (the steps' own effects are other tests')."""
    w.service.start()
    state = sm.begin_cutover(w.state(), PLAN.cutoff_ms + 1000)
    state["scope"] = {"move": ["tok-1"], "destroy": ["tok-10"], "retain": []}
    for step in sm.CUTOVER_STEPS:
        state = sm.step_done(state, step, PLAN.cutoff_ms + 2000, 1, {})
    w.redis.data[w.store.name("transfer", PLAN.id)] = orjson.dumps(state)
    return state


# --- complete -------------------------------------------------------------------------------------------
def test_complete_keeps_the_transfer_open_when_the_audit_chains_do_not_verify(world: World) -> None:
    cut_over(world)
    with pytest.raises(GuardError, match="did not verify.*run complete again"):
        world.service.complete(lambda state: {"ok": False, "breaks": ["chain x: checkpoint 3 does not match"]})
    state = world.state()
    assert state["phase"] == sm.CUT_OVER and state["completed_ms"] is None
    assert not world.store.handover_ended and world.service.states.active(PLAN.branch) == PLAN.id
    assert "transfer_completed" not in world.published.decisions()
    # the check can be repeated, and closes the transfer once it verifies
    done = world.service.complete(lambda state: {"ok": True})
    assert done["phase"] == sm.COMPLETED and world.state()["verification"] == {"ok": True}
    assert world.store.handover_ended and world.service.states.active(PLAN.branch) is None


# --- cutover --------------------------------------------------------------------------------------------
def _steps_as_doubles(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps whose effects are Kafka's and the key store's: recorded done, doing nothing here."""
    for step in ("destroy", "retain", "rewrap", "retire"):
        monkeypatch.setattr(w.service, f"_step_{step}", lambda state: {})


def test_the_prepared_key_leaves_the_state_once_the_key_step_is_recorded(world: World,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    world.service.start()
    prepared = world.state()["prepared_kek"]
    assert prepared
    _steps_as_doubles(world, monkeypatch)
    real_key_step = world.service._step_key

    def key_step_then_crash(state: dict[str, Any]) -> dict[str, Any]:
        real_key_step(state)  # installed and saved, not recorded done
        raise GuardError("killed")

    monkeypatch.setattr(world.service, "_step_key", key_step_then_crash)
    with pytest.raises(GuardError, match="killed"):
        world.service.cutover()
    assert world.state()["prepared_kek"] == prepared  # the rerun needs it: it installs the same key
    monkeypatch.setattr(world.service, "_step_key", real_key_step)
    done = world.service.cutover()
    assert done["phase"] == sm.CUT_OVER
    assert "prepared_kek" not in world.state() and "prepared_kek" not in done
    assert world.keys.installed == [b"incoming key wrapped by the master key"] * 2


def test_cutover_refuses_a_branch_that_start_did_not_freeze(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between start's state save and its entities write leaves the branch active, not frozen: the
    former owner keeps working after the cut-off. The cut-over refuses until `start` has re-applied it."""
    real_write = entities.write

    def killed(directory: Path, docs: list[dict[str, Any]]) -> bool:
        raise GuardError("killed before the entities write")

    monkeypatch.setattr(entities, "write", killed)
    with pytest.raises(GuardError, match="killed"):
        world.service.start()
    monkeypatch.setattr(entities, "write", real_write)
    assert world.state()["phase"] == sm.STARTED
    _steps_as_doubles(world, monkeypatch)
    with pytest.raises(sm.TransferStateError, match=r"not frozen from the cut-off.*guard transfer start"):
        world.service.cutover()
    assert world.state()["phase"] == sm.STARTED and not world.state()["steps"]
    world.service.start()  # the rerun re-applies the entities change
    assert world.service.cutover()["phase"] == sm.CUT_OVER
    # the policy step wrote the handed-over entities, then a crash before it was recorded: the rerun goes on
    state = world.state()
    del state["steps"]["policy"]
    state["phase"] = sm.CUTTING_OVER
    world.redis.data[world.store.name("transfer", PLAN.id)] = orjson.dumps(state)
    assert world.service.cutover()["phase"] == sm.CUT_OVER


def test_an_entities_write_the_policy_directory_does_not_load_fails_its_step(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines keep their last good policy when the directory stops loading (the old owner's, at the
    policy step): the write is not done until the directory loads, at `start` and at the policy step."""
    broken = world.policy / "zz-broken.cedar"
    broken.write_text('@id("half-edited") permit(principal, action, resource) when { principal. };\n')
    with pytest.raises(GuardError, match=r"does not load after.*zz-broken\.cedar.*guard policy validate"):
        world.service.start()
    broken.unlink()
    world.service.start()
    _steps_as_doubles(world, monkeypatch)
    broken.write_text('@id("half-edited") permit(principal, action, resource) when { principal. };\n')
    with pytest.raises(GuardError, match=r"does not load after the cut-over's policy step"):
        world.service.cutover()
    assert "policy" not in world.state()["steps"] and world.state()["phase"] == sm.CUTTING_OVER
    broken.unlink()
    assert world.service.cutover()["phase"] == sm.CUT_OVER


def test_cutover_renews_its_lock_between_steps_and_stops_once_it_lost_it(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.service.start()
    _steps_as_doubles(world, monkeypatch)
    lock = world.store.name("transfer-lock", PLAN.branch)

    def taken_over(state: dict[str, Any]) -> dict[str, Any]:  # this run hung past its lock's TTL meanwhile
        world.redis.data[lock] = b"otherhost 4242"
        return {}

    monkeypatch.setattr(world.service, "_step_retain", taken_over)
    with pytest.raises(sm.TransferStateError, match="no longer holds"):
        world.service.cutover()
    assert "retain" not in world.state()["steps"] and "destroy" in world.state()["steps"]
    assert world.redis.data[lock] == b"otherhost 4242"  # the other run's lock is left alone
    del world.redis.data[lock]
    monkeypatch.setattr(world.service, "_step_retain", lambda state: {})
    renewed = world.redis.renewals
    assert world.service.cutover()["phase"] == sm.CUT_OVER
    assert world.redis.renewals - renewed >= 5  # before each of the five steps left


# --- start ----------------------------------------------------------------------------------------------
def test_neither_the_state_nor_the_started_record_holds_customer_ids(world: World) -> None:
    """The key store and the audit topic (immutable) never hold customer ids: they hold the plan's digest
    and how many customers each list names; the ids stay in the operator's plan file, which every later
    command re-reads and checks against the digest."""
    world.service.start()
    state = world.state()
    record = world.published.detail("transfer_started")
    assert record["plan"] == state["plan"]
    assert state["plan"]["digest"] == "d1" and state["plan"]["cutoff"] == "2026-12-03T17:00:00Z"
    assert state["plan"]["scope"] == {
        "default": "move", "classes": ["C1", "C2"], "destroy_reason": "art47_1_purpose_achieved",
        "move_named": 4, "destroy_named": 3,
        "retain": [{"customers_named": 2, "legal_basis": "AML Law Art. 19: records kept 5 years",
                    "until": "2031-12-31T00:00:00Z"}]}
    raw = world.redis.data[world.store.name("transfer", PLAN.id)]
    for named in (b"2-4", b"10-12", b"[20,21]", b"[1,"):
        assert named not in raw and named not in orjson.dumps(record)
