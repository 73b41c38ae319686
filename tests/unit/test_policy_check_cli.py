"""`guard policy check` explains reveal, search, export and shred requests, not only writes.

The demo entities define no data subject (the reveal service passes the record's subject with each
request), so before the fix every check about a `DataSubject` was denied with "entity does not exist"
errors, whatever the policy said. A principal the entities don't know is named as such.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.cli.main import main
from guard.policy.engine import default_directory
from guard.policy.sources import staff_entities


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(default_directory(), target)
    docs = json.loads((target / "entities.json").read_text())
    docs += staff_entities([("m1", "0101", "bank-a", True, ["manager"]), ("t1", "0101", "bank-a", True, ["teller"]),
                            ("k1", "0101", "bank-a", True, ["marketing"])])
    (target / "entities.json").write_text(json.dumps(docs))
    return target


def check(policy_dir: Path, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["policy", "check", "--dir", str(policy_dir), "--json", *args],
                                env={"GUARD_POLICY_STAFF": "file"})
    return result.exit_code, json.loads(result.output)


def test_a_reveal_about_a_subject_the_entities_do_not_define_is_decided_by_the_policy(policy_dir: Path) -> None:
    code, body = check(policy_dir, "--principal", 'Staff::"m1"', "--action", "reveal", "--resource",
                       'DataSubject::"0101:42"', "--purpose", "kyc_review", "--field-class", "C2")
    assert code == 0, body
    assert body["decision"] == "allow" and body["policies"] == ["manager-reveals-c2-for-service"]
    assert body["errors"] == [] and body["unknown_entities"] == []
    code, body = check(policy_dir, "--principal", 'Staff::"t1"', "--action", "reveal", "--resource",
                       'DataSubject::"0101:42"', "--purpose", "kyc_review", "--field-class", "C2")
    assert code == 3 and body["policies"] == ["c2-reveal-needs-manager-or-compliance"] and body["errors"] == []


def test_consent_and_legal_hold_of_the_subject_are_options(policy_dir: Path) -> None:
    ask = ["--principal", "Staff:k1", "--action", "export", "--resource", 'DataSubject::"0101:42"', "--purpose",
           "marketing"]
    assert check(policy_dir, *ask)[0] == 3
    code, body = check(policy_dir, *ask, "--consent", "marketing")
    assert code == 0 and body["policies"] == ["marketing-export-needs-consent"], body


def test_an_unknown_principal_is_named(policy_dir: Path) -> None:
    result = CliRunner().invoke(main, ["policy", "check", "--dir", str(policy_dir), "--principal", "Staff:ghost",
                                       "--action", "write", "--resource", 'Table::"0101:public.customers"'],
                                env={"GUARD_POLICY_STAFF": "file"})
    assert result.exit_code == 3
    assert "unknown: Staff:ghost is not among the policy's entities" in result.output
