"""The Cedar policy engine: loading and validation, decisions naming their policies, the decision cache and
its invalidation, hot reload (a bad reload refused, the running policy kept), the CLI."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.cli import main
from guard.policy.engine import PolicyEngine, PolicyError, Request, default_directory, validate_directory
from guard.policy.model import cedar_datetime, entity, ref
from guard.policy.sources import staff_entities

CUSTOMERS = ("Table", "0101:public.customers")
BEFORE = datetime(2027, 3, 1, tzinfo=UTC)
CUTOFF = "2027-03-31T16:00:00Z"
AFTER = datetime(2027, 4, 1, tzinfo=UTC)


def ctx(when: datetime = BEFORE, **extra: object) -> dict[str, object]:
    return {"time": when, "purpose": "branch_operation", "source": "cdc", "volume": 1, **extra}


STAFF = staff_entities([
    ("t1", "0101", "bank-a", True, ["teller"]),
    ("m1", "0101", "bank-a", True, ["manager"]),
    ("t2", "0102", "bank-a", True, ["teller"]),
    ("gone", "0101", "bank-a", False, ["manager"]),
    ("b1", "0101", "bank-b", True, ["manager", "compliance"]),
])


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A copy of the demo policy with branch 0101 under a cut-off, and the test staff in entities.json."""
    target = tmp_path / "policy"
    shutil.copytree(default_directory(), target)
    docs = json.loads((target / "entities.json").read_text())
    for doc in docs:
        if doc["uid"]["id"] == "0101" and doc["uid"]["type"].endswith("Branch"):
            doc["attrs"]["cutoff"] = cedar_datetime(datetime.fromisoformat(CUTOFF.replace("Z", "+00:00")))
    docs += STAFF
    docs.append(entity("DataSubject", "0101:7", {"branch": ref("Branch", "0101"), "consent": [],
                                                 "legal_hold": True}, [("Branch", "0101")]))
    (target / "entities.json").write_text(json.dumps(docs))
    return target


def test_the_demo_policy_directory_validates() -> None:
    assert validate_directory(default_directory()) == []


def test_roles_and_branches_decide_writes(policy_dir: Path) -> None:
    engine = PolicyEngine(policy_dir)
    teller = engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx())
    assert teller.allowed and teller.policies == ("teller-writes-own-branch",)
    assert not engine.decide(("Staff", "t1"), "delete", CUSTOMERS, ctx()).allowed  # tellers don't delete
    manager = engine.decide(("Staff", "m1"), "delete", CUSTOMERS, ctx())
    assert manager.allowed and manager.policies == ("manager-writes-and-deletes-own-branch",)
    other_branch = engine.decide(("Staff", "t2"), "write", CUSTOMERS, ctx())
    assert not other_branch.allowed and other_branch.policies == ()
    assert other_branch.reason == "no policy permits it (default deny)"
    gone = engine.decide(("Staff", "gone"), "write", CUSTOMERS, ctx())
    assert not gone.allowed and gone.policies == ("inactive-staff-do-nothing",)


def test_cutoff_stops_everybody_outside_the_owner(policy_dir: Path) -> None:
    engine = PolicyEngine(policy_dir)
    subject = ("DataSubject", "0101:7")
    reveal = ctx(purpose="aml_investigation", field_class="C1")
    assert engine.decide(("Staff", "b1"), "reveal", subject, reveal).allowed  # compliance of bank-b, before
    after = engine.decide(("Staff", "b1"), "reveal", subject, dict(reveal, time=AFTER))
    assert not after.allowed and after.policies == ("nobody-outside-owner-after-cutoff",)
    # the owner's staff keep working after the cut-off
    assert engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx(AFTER)).allowed


def test_c3_never_revealed_and_legal_hold_blocks_shred(policy_dir: Path) -> None:
    engine = PolicyEngine(policy_dir)
    subject = ("DataSubject", "0101:7")
    c3 = engine.decide(("Staff", "m1"), "reveal", subject, ctx(purpose="kyc_review", field_class="C3"))
    assert not c3.allowed and c3.policies == ("c3-never-revealed",)
    c2 = engine.decide(("Staff", "m1"), "reveal", subject, ctx(purpose="kyc_review", field_class="C2"))
    assert c2.allowed and c2.policies == ("manager-reveals-c2-for-service",)
    wrong_purpose = engine.decide(("Staff", "m1"), "reveal", subject, ctx(purpose="curiosity", field_class="C2"))
    assert not wrong_purpose.allowed
    engine.add_entities([entity("Staff", "dpo1", {"branch": ref("Branch", "0101"),
                                                  "organisation": ref("Organisation", "bank-a"), "active": True},
                                [("Role", "dpo")])])
    shred = engine.decide(("Staff", "dpo1"), "shred", subject, ctx())
    assert not shred.allowed and shred.policies == ("legal-hold-blocks-shred",)


def test_request_entities_decide_without_being_cached(policy_dir: Path) -> None:
    """A reveal about one customer passes the customer's entity with the request (consent, legal hold)."""
    from guard.policy.model import subject_entity

    engine = PolicyEngine(policy_dir)
    engine.add_entities([entity("Staff", "mk1", {"branch": ref("Branch", "0101"),
                                                 "organisation": ref("Organisation", "bank-a"), "active": True},
                                [("Role", "marketing")])])
    ask = ctx(purpose="marketing", volume=10)
    agreed = subject_entity("0101", 8, consent=["marketing"], retention_until=AFTER)
    refused = subject_entity("0101", 9)
    yes = engine.decide(("Staff", "mk1"), "export", ("DataSubject", "0101:8"), ask, entities=[agreed])
    no = engine.decide(("Staff", "mk1"), "export", ("DataSubject", "0101:9"), ask, entities=[refused])
    assert yes.allowed and yes.policies == ("marketing-export-needs-consent",) and not no.allowed
    assert engine.stats.hits == 0 and engine.stats.evaluations == 2


def test_unknown_principal_is_denied_with_the_error(policy_dir: Path) -> None:
    decision = PolicyEngine(policy_dir).decide(("Staff", "nobody"), "write", CUSTOMERS, ctx())
    assert not decision.allowed and decision.errors
    assert "nobody" in decision.errors[0] and "default deny" in decision.reason


def test_a_context_outside_the_schema_is_denied(policy_dir: Path) -> None:
    decision = PolicyEngine(policy_dir).decide(("Staff", "t1"), "write", CUSTOMERS, {"time": BEFORE})
    assert not decision.allowed and decision.errors


def test_cache_hits_within_a_bucket_and_evaluates_once_per_key(policy_dir: Path) -> None:
    engine = PolicyEngine(policy_dir, bucket_s=1.0)
    t = BEFORE.timestamp()
    requests = [Request(("Staff", "t1"), "write", CUSTOMERS, ctx(datetime.fromtimestamp(t + i / 1000, UTC)))
                for i in range(500)]
    decisions = engine.decide_batch(requests)
    assert all(d.allowed for d in decisions)
    assert engine.stats.evaluations == 1
    engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx(datetime.fromtimestamp(t + 0.9, UTC)))
    assert engine.stats.hits == 1 and engine.stats.evaluations == 1
    engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx(datetime.fromtimestamp(t + 1.0, UTC)))
    assert engine.stats.evaluations == 2  # the next bucket


def test_decisions_in_a_bucket_are_the_buckets(policy_dir: Path) -> None:
    """A cached decision is the one computed at the bucket's start: the same for every request in it."""
    engine = PolicyEngine(policy_dir, bucket_s=60.0)
    cut = datetime.fromisoformat(CUTOFF.replace("Z", "+00:00")).timestamp()
    subject = ("DataSubject", "0101:7")
    reveal = ctx(purpose="aml_investigation")
    late = engine.decide(("Staff", "b1"), "reveal", subject, dict(reveal, time=cut + 59))
    fresh = PolicyEngine(policy_dir, bucket_s=60.0).decide(("Staff", "b1"), "reveal", subject,
                                                           dict(reveal, time=cut + 1))
    assert late == fresh and not late.allowed


def test_entity_changes_and_reloads_drop_the_cache(policy_dir: Path) -> None:
    engine = PolicyEngine(policy_dir, check_interval_s=0)
    engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx())
    generation = engine.generation
    assert engine.add_entities([entity("Role", "teller")]) == 0  # nothing new: the cache stays
    assert engine.generation == generation
    assert engine.add_entities([entity("Table", "0101:public.loans", {"branch": ref("Branch", "0101"),
                                       "name": "public.loans", "subject_root": False})]) == 1
    assert engine.generation == generation + 1
    assert engine.decide(("Staff", "t1"), "write", ("Table", "0101:public.loans"), ctx()).allowed
    assert engine.stats.invalidations == 1


def test_staff_from_a_source_are_refreshed(policy_dir: Path) -> None:
    rows = [("s1", "0101", "bank-a", True, ["teller"])]
    engine = PolicyEngine(policy_dir, entity_source=lambda: staff_entities(rows), entity_refresh_s=0,
                          check_interval_s=3600)
    assert engine.decide(("Staff", "s1"), "write", CUSTOMERS, ctx()).allowed
    rows[0] = ("s1", "0101", "bank-a", False, ["teller"])  # deactivated in the branch database
    assert engine.maybe_reload() is True
    assert not engine.decide(("Staff", "s1"), "write", CUSTOMERS, ctx()).allowed


def _touch(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_takes_effect_and_a_bad_reload_is_refused(policy_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = PolicyEngine(policy_dir, check_interval_s=0)
    assert not engine.decide(("Staff", "t1"), "delete", CUSTOMERS, ctx()).allowed
    extra = policy_dir / "extra.cedar"
    _touch(extra, '@id("tellers-delete-too")\npermit (principal in BranchGuard::Role::"teller", '
                  'action == BranchGuard::Action::"delete", resource);\n')
    assert engine.maybe_reload() is True
    decision = engine.decide(("Staff", "t1"), "delete", CUSTOMERS, ctx())
    assert decision.allowed and decision.policies == ("tellers-delete-too",)
    running = engine.digest
    # A policy that doesn't validate (unknown attribute): refused, logged, the running policy kept.
    _touch(extra, '@id("broken")\npermit (principal, action, resource) when { principal.salary > 3 };\n')
    with caplog.at_level("ERROR", logger="guard.policy"):
        assert engine.maybe_reload() is False
    assert "reload refused" in caplog.text and engine.last_error and "broken" in engine.last_error
    assert engine.digest == running
    assert engine.decide(("Staff", "t1"), "delete", CUSTOMERS, ctx()).policies == ("tellers-delete-too",)
    # a syntax error and a policy without @id are refused too
    for bad in ("permit (principal, action, resource);\n", "@id(\"x\") permit (principal,"):
        _touch(extra, bad)
        assert engine.maybe_reload() is False and engine.digest == running
    extra.unlink()
    assert engine.maybe_reload() is True
    assert not engine.decide(("Staff", "t1"), "delete", CUSTOMERS, ctx()).allowed


def test_a_directory_that_does_not_validate_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyEngine(tmp_path / "none")
    shutil.copytree(default_directory(), tmp_path / "p")
    (tmp_path / "p" / "dup.cedar").write_text('@id("dpo-shreds")\nforbid (principal, action, resource);\n')
    with pytest.raises(PolicyError, match="used twice"):
        PolicyEngine(tmp_path / "p")
    (tmp_path / "p" / "dup.cedar").unlink()
    (tmp_path / "p" / "entities.json").write_text('[{"uid": {"type": "BranchGuard::Branch", "id": "x"}, '
                                                  '"attrs": {"code": 5}, "parents": []}]')
    with pytest.raises(PolicyError, match="entities.json"):
        PolicyEngine(tmp_path / "p")


def test_cli_validate_and_check(policy_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"GUARD_POLICY_STAFF": "file"}
    ok = runner.invoke(main, ["policy", "validate", str(policy_dir)], env=env)
    assert ok.exit_code == 0 and "17 policies" in ok.output and "@id(c3-never-revealed)" in ok.output
    (tmp_path / "bad").mkdir()
    bad = runner.invoke(main, ["policy", "validate", str(tmp_path / "bad")], env=env)
    assert bad.exit_code == 1 and "INVALID" in bad.output
    allow = runner.invoke(main, ["policy", "check", "--dir", str(policy_dir), "--principal", 'Staff::"m1"',
                                 "--action", "delete", "--resource", 'Table::"0101:public.customers"',
                                 "--time", "2027-03-01T00:00:00Z"], env=env)
    assert allow.exit_code == 0, allow.output
    assert "decision: ALLOW" in allow.output and "manager-writes-and-deletes-own-branch" in allow.output
    deny = runner.invoke(main, ["policy", "check", "--dir", str(policy_dir), "--principal", "Staff:b1",
                                "--action", "reveal", "--resource", 'DataSubject::"0101:7"', "--purpose",
                                "aml_investigation", "--time", "2027-04-01T00:00:00Z", "--json"], env=env)
    assert deny.exit_code == 3
    body = json.loads(deny.output)
    assert body["decision"] == "deny" and body["policies"] == ["nobody-outside-owner-after-cutoff"]
