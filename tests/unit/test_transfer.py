"""The transfer's pure logic: plan validation, the state machine, the policy entities it changes, the state
store's lock, and the report's determinism (from a state and records given, no stack)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from guard.config import Settings
from guard.errors import ConfigError
from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities
from guard.transfer import entities
from guard.transfer import state as sm
from guard.transfer.plan import compact, parse_plan, resolve
from guard.transfer.report import build, reader_group, to_html, to_json

VALID: dict[str, Any] = {
    "transfer": {"id": "t-0101", "branch": "0101", "from": "bank-a", "to": "bank-b",
                 "cutoff": "2026-12-03T17:00:00Z", "by": "dpo@bank-a"},
    "scope": {"default": "move", "classes": ["C1", "C2"], "move": [1, "2-4"], "destroy": ["10-12"],
              "retain": [{"customers": [20, 21], "legal_basis": "AML Law Art. 19: records kept 5 years",
                          "until": "2031-12-31T00:00:00Z"}]},
    "incoming_staff": [{"id": "m-b", "roles": ["manager"]}],
}


def plan_doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(VALID))
    for path, value in changes.items():
        section, key = path.split("__")
        if value is None:
            doc[section].pop(key, None)
        else:
            doc[section][key] = value
    return doc


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_plan(doc)
    return str(info.value)


def test_a_valid_plan_reads_every_field() -> None:
    plan = parse_plan(VALID, digest="d1")
    assert (plan.id, plan.branch, plan.from_org, plan.to_org, plan.by) == ("t-0101", "0101", "bank-a", "bank-b",
                                                                         "dpo@bank-a")
    assert plan.cutoff_ms == 1796317200000
    assert plan.move == {1, 2, 3, 4} and plan.destroy == {10, 11, 12}
    assert plan.retain[0].customers == {20, 21} and plan.retain[0].until is not None
    assert [(s.id, s.roles) for s in plan.incoming_staff] == [("m-b", ("manager",))]
    assert plan.disposition(3) == ("move", None)
    assert plan.disposition(11) == ("destroy", None)
    assert plan.disposition(20)[0] == "retain" and plan.disposition(20)[1] is plan.retain[0]
    assert plan.disposition(99) == ("move", None)  # the default
    assert plan.as_dict()["scope"]["destroy"] == ["10-12"] and plan.as_dict()["digest"] == "d1"
    assert compact([7, 1, 2, 3, 4, 9, 10]) == ["1-4", 7, 9, 10] and compact([]) == []
    assert parse_plan(plan_doc(scope__move=compact(range(100, 200_100)))).move == frozenset(range(100, 200_100))


def test_resolve_covers_the_database_and_the_plan() -> None:
    plan = parse_plan(plan_doc(scope__default="destroy"))
    got = resolve(plan, [1, 5, 6, 11])
    assert got == {1: "move", 2: "move", 3: "move", 4: "move", 5: "destroy", 6: "destroy", 10: "destroy",
                   11: "destroy", 12: "destroy", 20: "retain", 21: "retain"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"transfer__id": "bad id!"}, "transfer.id"),
    ({"transfer__to": "bank-a"}, "same organisation"),
    ({"transfer__cutoff": "2026-12-03T17:00:00"}, "give the offset"),
    ({"transfer__cutoff": "tomorrow"}, "not an RFC 3339 time"),
    ({"transfer__cutoff": None}, "transfer.cutoff is missing"),
    ({"transfer__by": None}, "transfer.by is missing"),
    ({"transfer__extra": 1}, "unknown fields extra"),
    ({"scope__default": "retain"}, "scope.default"),
    ({"scope__classes": ["C2"]}, "C1 and C2 together"),
    ({"scope__classes": ["C1", "C2", "C3"]}, "C3 (authentication data) never moves"),
    ({"scope__move": [1, "5-3"]}, "empty or too large"),
    ({"scope__move": [True]}, "not a customer id"),
    ({"scope__destroy": [1]}, "customer 1 is in both scope.move and scope.destroy"),
    ({"scope__destroy_reason": "because"}, "scope.destroy_reason"),
    ({"scope__retain": [{"customers": [30], "legal_basis": "x"}]}, "legal_basis"),
    ({"scope__retain": [{"customers": [30], "legal_basis": "AML Law Art. 19", "until": "2020-01-01T00:00:00Z"}]},
     "after the cut-off"),
    ({"scope__retain": [{"customers": [], "legal_basis": "AML Law Art. 19"}]}, "at least one customer"),
])
def test_invalid_plans_are_refused_with_the_field_named(changes: dict[str, Any], message: str) -> None:
    assert message in errors_of(plan_doc(**changes))


def test_every_problem_is_listed_at_once() -> None:
    text = errors_of(plan_doc(transfer__id="bad id!", scope__default="keep", transfer__to=None))
    assert "transfer.id" in text and "scope.default" in text and "transfer.to is missing" in text


def test_incoming_staff_and_missing_sections() -> None:
    doc = plan_doc()
    doc["incoming_staff"] = [{"id": "x", "roles": ["boss"]}]
    assert "incoming_staff[0].roles" in errors_of(doc)
    assert "[scope] is missing" in errors_of({"transfer": VALID["transfer"]})


# --- the state machine -----------------------------------------------------------------------------------
PLAN = parse_plan(VALID, digest="d1").as_dict()


def started() -> dict[str, Any]:
    return sm.new_state(PLAN, 1_000, "cHJlcGFyZWQ=")


def test_start_is_idempotent_and_exclusive_per_branch() -> None:
    assert sm.can_start(None, None, "t-0101") is True
    assert sm.can_start(started(), "t-0101", "t-0101") is False  # a rerun: nothing to do
    with pytest.raises(sm.TransferStateError, match="not completed"):
        sm.can_start(None, "t-other", "t-0101")
    cut = sm.begin_cutover(started(), 2_000)
    with pytest.raises(sm.TransferStateError, match="already cutting_over"):
        sm.can_start(cut, "t-0101", "t-0101")


def test_a_later_command_must_name_the_recorded_plan() -> None:
    sm.check_plan(started(), PLAN)
    with pytest.raises(sm.TransferStateError, match="another plan"):
        sm.check_plan(started(), {**PLAN, "digest": "d2"})


def test_cutover_not_before_the_cutoff() -> None:
    cutoff = sm.cutoff_of(started())
    with pytest.raises(sm.TransferStateError, match="runs from then on"):
        sm.may_cut_over(started(), cutoff - 1)
    sm.may_cut_over(started(), cutoff)


def test_steps_run_in_order_and_resume_where_they_stopped() -> None:
    state = sm.begin_cutover(started(), 2_000)
    assert state["phase"] == sm.CUTTING_OVER and state["cutover_started_ms"] == 2_000
    assert sm.remaining_steps(state) == list(sm.CUTOVER_STEPS)
    with pytest.raises(sm.TransferStateError, match="before scope"):
        sm.step_done(state, "destroy", 3_000, 1, {})
    state = sm.step_done(state, "scope", 3_000, 5, {"x": 1})
    state = sm.step_done(state, "destroy", 3_100, 5, {})
    # a crash here: the rerun resumes at "retain" and keeps the first run's start time
    rerun = sm.begin_cutover(state, 9_000)
    assert sm.remaining_steps(rerun) == ["retain", "key", "rewrap", "retire", "policy"]
    assert rerun["cutover_started_ms"] == 2_000 and len(rerun["runs"]) == 2
    with pytest.raises(sm.TransferStateError, match="run cutover to its end"):
        sm.may_complete(rerun)
    for step in sm.remaining_steps(rerun):
        rerun = sm.step_done(rerun, step, 10_000, 1, {})
    assert rerun["phase"] == sm.CUT_OVER and sm.remaining_steps(rerun) == []
    assert sm.may_complete(rerun) is True
    done = sm.complete(rerun, 11_000, {"ok": True})
    assert done["phase"] == sm.COMPLETED and sm.may_complete(done) is False
    with pytest.raises(sm.TransferStateError, match="is completed"):
        sm.remaining_steps(done)
    with pytest.raises(ValueError, match="unknown step"):
        sm.step_done(rerun, "nap", 1, 1, {})


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class FakeRedis:
    """The Redis calls of the transfer's state store, in memory. `after_get[name]` runs once right after a
    GET of `name` has read its value: another process acting between that read and what the reader does
    next. The state store's scripts run whole, as Redis runs a Lua script: nothing comes in between."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int] = {}
        self.renewals = 0
        self.after_get: dict[str, Callable[[], object]] = {}

    def get(self, name: str) -> bytes | None:
        value = self.data.get(name)
        hook = self.after_get.pop(name, None)
        if hook is not None:
            hook()
        return value

    def set(self, name: str, value: Any, ex: int | None = None, nx: bool = False) -> bool:
        if nx and name in self.data:
            return False
        self.data[name] = _bytes(value)
        if ex is not None:
            self.ttl[name] = ex
        return True

    def delete(self, *names: str) -> int:
        return sum(1 for n in names if self.data.pop(n, None) is not None)

    def register_script(self, script: str) -> Callable[..., int]:
        def run(keys: list[str], args: list[Any]) -> int:
            if self.data.get(keys[0]) != _bytes(args[0]):  # every script: only while ARGV[1] holds KEYS[1]
                return 0
            if script == sm.RELEASE_LOCK:
                del self.data[keys[0]]
            elif script == sm.RENEW_LOCK:
                self.renewals += 1
                self.ttl[keys[0]] = int(args[1])
            elif script == sm.SAVE_IF_HOLDER:
                self.data[keys[1]] = _bytes(args[1])
            else:
                raise AssertionError(f"a script the fake does not know: {script}")
            return 1
        return run


def test_state_store_keeps_the_state_and_a_crashed_runs_lock_is_taken_over() -> None:
    fake = FakeRedis()
    store = sm.StateStore(fake, lambda *parts: "bg:t:" + ":".join(parts))
    store.lock("0101", wait_s=0)
    store.save(started())
    store.unlock("0101")
    assert store.load("t-0101") == started() and store.load("nope") is None
    store.set_active("0101", "t-0101")
    assert store.active("0101") == "t-0101"
    store.set_active("0101", None)
    assert store.active("0101") is None
    # a lock held by a process of this host that is gone (a SIGKILLed cutover) is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake.data["bg:t:transfer-lock:0101"] = f"{socket.gethostname()} {dead.pid}".encode()
    store.lock("0101", wait_s=1)
    assert fake.data["bg:t:transfer-lock:0101"] == store.owner.encode()
    fake.data["bg:t:transfer-lock:0101"] = f"elsewhere {os.getpid()}".encode()
    with pytest.raises(sm.TransferStateError, match="another process"):
        store.lock("0101", wait_s=0.1)
    fake.data["bg:t:transfer-lock:0101"] = store.owner.encode()
    store.unlock("0101")
    assert "bg:t:transfer-lock:0101" not in fake.data


LOCK = "bg:t:transfer-lock:0101"


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _two_processes() -> tuple[FakeRedis, sm.StateStore, sm.StateStore]:
    """Two runs on this host, both alive (the test process and its parent), sharing one Redis."""
    fake = FakeRedis()
    first, second = (sm.StateStore(fake, lambda *parts: "bg:t:" + ":".join(parts)) for _ in range(2))
    first.owner, second.owner = f"{socket.gethostname()} {os.getpid()}", f"{socket.gethostname()} {os.getppid()}"
    return fake, first, second


def test_two_reruns_taking_over_a_dead_holder_leave_exactly_one_holder() -> None:
    fake, first, second = _two_processes()
    fake.data[LOCK] = f"{socket.gethostname()} {_dead_pid()}".encode()
    # the second reads the dead holder; before it takes the lock over, the first does
    fake.after_get[LOCK] = lambda: first.lock("0101", wait_s=0)
    with pytest.raises(sm.TransferStateError, match="another process"):
        second.lock("0101", wait_s=0)
    assert fake.data[LOCK] == first.owner.encode()
    second.unlock("0101")  # not its lock: kept
    assert fake.data[LOCK] == first.owner.encode()
    first.unlock("0101")
    assert LOCK not in fake.data


def test_a_run_that_lost_its_lock_neither_saves_nor_renews() -> None:
    fake, first, second = _two_processes()
    first.lock("0101", wait_s=0)
    first.save(started())
    del fake.data[LOCK]  # expired (the first run hung for longer than its TTL), and the second took it
    second.lock("0101", wait_s=0, ttl_s=600)
    with pytest.raises(sm.TransferStateError, match="no longer holds"):
        first.save({**started(), "phase": sm.CUTTING_OVER})
    assert second.load("t-0101") == started()
    with pytest.raises(sm.TransferStateError, match="no longer holds"):
        first.renew("0101")
    second.renew("0101")  # the holder's renewal: its TTL again
    assert (fake.data[LOCK], fake.ttl[LOCK], fake.renewals) == (second.owner.encode(), 600, 1)


# --- the policy entities ------------------------------------------------------------------------------------
def test_entities_at_start_and_at_cutover_decide_as_docs_transfer_says(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(default_directory(), policy)
    docs = entities.read(policy)
    staff = staff_entities([("old-m", "0101", "bank-a", True, ["manager"]),
                            ("old-c", "0101", "bank-a", True, ["compliance"]),
                            ("hq-c", "0202", "bank-a", True, ["compliance"])])
    cutoff_ms = 1796317200000
    with pytest.raises(Exception, match="owned by bank-a, not by"):
        entities.at_start(docs, "0101", "bank-x", cutoff_ms)
    assert entities.write(policy, entities.at_start(docs, "0101", "bank-a", cutoff_ms) + staff)
    engine = PolicyEngine(policy)
    subject = ("DataSubject", "0101:1")
    before, after = (cutoff_ms - 1000) / 1000, (cutoff_ms + 1000) / 1000
    reveal = {"purpose": "kyc_review", "source": "reveal-api", "volume": 1, "field_class": "C2"}
    sub = [{"uid": {"type": "BranchGuard::DataSubject", "id": "0101:1"},
            "attrs": {"branch": {"__entity": {"type": "BranchGuard::Branch", "id": "0101"}}, "consent": [],
                      "legal_hold": False}, "parents": [{"type": "BranchGuard::Branch", "id": "0101"}]}]
    assert engine.decide(("Staff", "old-m"), "reveal", subject, {**reveal, "time": before}, entities=sub).allowed
    frozen = engine.decide(("Staff", "old-m"), "reveal", subject, {**reveal, "time": after}, entities=sub)
    assert not frozen.allowed and frozen.policies == ("freeze-between-cutoff-and-cutover",)
    # Compliance too: the outgoing owner's, at the branch or at head office, reads nothing from the cut-off on,
    # whenever the cut-over runs (an investigation waits for it).
    investigation = {**reveal, "purpose": "aml_investigation"}
    for officer in ("old-c", "hq-c"):
        assert engine.decide(("Staff", officer), "reveal", subject, {**investigation, "time": before},
                             entities=sub).allowed, officer
        frozen = engine.decide(("Staff", officer), "reveal", subject, {**investigation, "time": after}, entities=sub)
        assert not frozen.allowed and frozen.policies == ("freeze-between-cutoff-and-cutover",), (officer, frozen)
    # the cut-over's policy step, twice: the same list
    once = entities.at_cutover(entities.read(policy), "0101", "bank-a", "bank-b", cutoff_ms, [("new-m", ["manager"])])
    assert entities.at_cutover(once, "0101", "bank-a", "bank-b", cutoff_ms, [("new-m", ["manager"])]) == once
    assert entities.write(policy, once) and not entities.write(policy, once)
    engine.maybe_reload(force=True)
    old = engine.decide(("Staff", "old-m"), "reveal", subject, {**reveal, "time": after}, entities=sub)
    assert not old.allowed and old.policies == ("nobody-outside-owner-after-cutoff",)
    for officer in ("old-c", "hq-c"):
        old = engine.decide(("Staff", officer), "reveal", subject, {**investigation, "time": after}, entities=sub)
        assert not old.allowed and old.policies == ("nobody-outside-owner-after-cutoff",), (officer, old)
    new = engine.decide(("Staff", "new-m"), "reveal", subject, {**reveal, "time": after}, entities=sub)
    assert new.allowed, new
    assert entities.owner_of(entities.read(policy), "0101") == "bank-b"


# --- the report ---------------------------------------------------------------------------------------------
def test_the_report_is_deterministic_and_names_former_staff_attempts() -> None:
    from guard.records.builders import RecordBuilder
    from guard.records.codec import write_reason

    settings = Settings()
    state = sm.new_state(PLAN, 1_000, "x")
    state["scope"] = {"move": ["s1"], "destroy": ["s2"], "retain": [{"subject": "s3", "legal_basis": "AML",
                                                                     "until_ms": None}], "not_in_database": []}
    state["destroyed"] = {"s2": {"id": "c-1", "outcome": "shredded"}}
    state["retained"] = {"s3": {"legal_basis": "AML", "until_ms": None}}
    cutoff = sm.cutoff_of(state)
    for step in sm.CUTOVER_STEPS:
        state = sm.step_done(state, step, cutoff + 10, 1, {"former_staff": ["Staff:old-m"]} if step == "policy"
                             else {})
    state = sm.complete(state, cutoff + 100_000, {"ok": True})

    class NoKeys:
        pass

    builder = RecordBuilder(settings, NoKeys(), clock=lambda: (cutoff + 50) / 1000)  # type: ignore[arg-type]
    audit = builder.audit("br0101.public.customers", 0, 5, "public.customers", "u", "s1", "write_denied",
                          orjson.dumps({"principal": "Staff:old-m", "action": "write",
                                        "policies": ["nobody-outside-owner-after-cutoff"]}).decode(), {}, {})
    # audit format 2: the change's own record carries its write decision
    change = builder.audit("br0101.public.customers", 0, 6, "public.customers", "u", "s1", "protected",
                           write_reason({"decision": "deny", "principal": "Staff:old-m", "action": "write",
                                         "policies": ["nobody-outside-owner-after-cutoff"]}), {}, {})
    records = {settings.audit_topic: [(cutoff + 50, "guard.audit[0]@7", None, audit.value),
                                      (cutoff + 55, "guard.audit[0]@8", None, change.value)],
               settings.deletions_topic: [(cutoff + 20, "guard.deletions[0]@1", None, b'{"id": "c-1"}')],
               settings.anomalies_topic: [(cutoff + 60, "guard.anomalies[0]@3", None,
                                           b'{"rule": "write_denied", "branch": "0101", "at_ms": 1}')]}
    report = build(settings, state, reader=lambda topic, since: records[topic])
    assert report["counts"]["destroyed"] == 1 and report["counts"]["confirmations_on_topic"] == 1
    assert report["counts"]["held_storage_only"] == 1 and report["counts"]["moved"] == 1
    attempts = report["access_after_cutoff"]["attempts"]
    assert [(a["principal"], a["decision"], a["subject"]) for a in attempts] == [
        ("Staff:old-m", "write_denied", "s1"), ("Staff:old-m", "write_denied", "s1")]
    assert [a["rule"] for a in report["anomalies"]] == ["write_denied"]
    again = build(settings, state, reader=lambda topic, since: records[topic])
    assert to_json(report) == to_json(again) and to_html(report) == to_html(again)
    assert "Staff:old-m" in to_html(report) and "provisional" not in to_html(report)


def test_the_report_reads_under_the_principals_own_group() -> None:
    import dataclasses

    assert reader_group(Settings()) == "guard-transfer-report"
    assert reader_group(dataclasses.replace(Settings(), kafka_username="oncall")) == "oncall-transfer-report"


def test_the_reports_counts_say_what_they_count() -> None:
    """A shred, a customer kept by a legal hold (`held_storage_only`: not destroyed), a retention of the
    plan, a reveal that returned part of a record, and a moving customer the plan names that the branch
    database does not have: each is counted under its own name, none under another's."""
    from guard.records.builders import RecordBuilder

    settings = Settings()
    state = sm.new_state(PLAN, 1_000, "x")
    state["scope"] = {"move": ["s1", "s9"], "destroy": ["s2", "s4"],
                      "retain": [{"subject": "s3", "legal_basis": "AML", "until_ms": None}],
                      "not_in_database": ["s9"]}
    state["destroyed"] = {"s2": {"id": "c-2", "outcome": "shredded"},
                          "s4": {"id": "c-4", "outcome": "held_storage_only"}}
    state["retained"] = {"s3": {"legal_basis": "AML", "until_ms": None}}
    cutoff = sm.cutoff_of(state)
    for step in sm.CUTOVER_STEPS:
        state = sm.step_done(state, step, cutoff + 10, 1, {"former_staff": ["Staff:old-m"]} if step == "policy"
                             else {})
    state = sm.complete(state, cutoff + 100_000, {"ok": True})

    class NoKeys:
        pass

    builder = RecordBuilder(settings, NoKeys(), clock=lambda: (cutoff + 50) / 1000)  # type: ignore[arg-type]
    partial = builder.audit("reveal-api", 0, 1, None, "reveal", "s1", "reveal_partial",
                            orjson.dumps({"principal": "Staff:old-m", "action": "reveal",
                                          "policies": ["some-permit"]}).decode(), {}, {})
    records = {settings.audit_topic: [(cutoff + 50, "guard.audit[0]@9", None, partial.value)],
               settings.deletions_topic: [(cutoff + 20, "guard.deletions[0]@1", None, b'{"id": "c-2"}'),
                                          (cutoff + 21, "guard.deletions[0]@2", None, b'{"id": "c-4"}')],
               settings.anomalies_topic: []}
    report = build(settings, state, reader=lambda topic, since: records[topic])
    counts = report["counts"]
    assert counts["destroyed"] == 1 and [d["subject"] for d in report["destroyed"]] == ["s2"]
    assert counts["destroy_outcomes"] == {"held_storage_only": 1, "shredded": 1}
    assert [(d["subject"], d["outcome"]) for d in report["out_of_scope_not_destroyed"]] == [("s4", "held_storage_only")]
    assert (counts["held_storage_only"], counts["held_by_retention"], counts["held_by_legal_hold"]) == (2, 1, 1)
    assert [(h["subject"], h["held_by"]) for h in report["held"]] == [("s3", "retention"), ("s4", "legal_hold")]
    assert (counts["moved"], counts["named_by_plan_not_in_database"]) == (1, {"destroy": 0, "move": 1, "retain": 0})
    assert report["moved"] == ["s1"]
    access = report["access_after_cutoff"]
    assert [a["decision"] for a in access["attempts"]] == ["reveal_partial"]
    assert (access["allowed"], access["allowed_in_part"]) == (1, 1)
    assert "1 allowed (1 of them in part)" in to_html(report)
    assert counts["confirmations"] == 2 and counts["confirmations_on_topic"] == 2
