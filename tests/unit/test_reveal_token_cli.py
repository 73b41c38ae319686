"""`guard reveal token create` refuses a principal the policy doesn't know, before anything is stored.

A token for a misspelt or departed principal would be denied on every call and look like a policy fault
when used; the command says so at creation instead (the key store is never reached: the Redis URL here
points at a closed port).
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

_ENV = {"GUARD_POLICY_STAFF": "file", "GUARD_REDIS_URL": "redis://127.0.0.1:9/0"}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(default_directory(), target)
    docs = json.loads((target / "entities.json").read_text())
    docs += staff_entities([("m1", "0101", "bank-a", True, ["manager"])])
    (target / "entities.json").write_text(json.dumps(docs))
    return target


def _create(policy_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["reveal", "token", "create", "--policy", str(policy_dir), *args], env=_ENV)
    return result.exit_code, result.output


def test_an_unknown_principal_is_refused_and_nothing_is_stored(policy_dir: Path) -> None:
    code, out = _create(policy_dir, "--principal", "Staff::m2")
    assert code == 1
    assert "Staff::m2 is not an entity of the policy" in out and "--allow-unknown-principal" in out
    assert "bgr_" not in out


def test_a_malformed_principal_is_told_what_a_principal_looks_like(policy_dir: Path) -> None:
    code, out = _create(policy_dir, "--principal", "m1")
    assert code == 1 and "a principal is Kind::id" in out


def test_a_known_principal_passes_the_check_and_reaches_the_key_store(policy_dir: Path) -> None:
    # The check passes; the (closed) key store is what fails, with the store's own error.
    code, out = _create(policy_dir, "--principal", "Staff::m1")
    assert code != 0 and "not an entity" not in out
    code, out = _create(policy_dir, "--principal", "Staff::m2", "--allow-unknown-principal")
    assert code != 0 and "warning: Staff::m2 is not an entity of the policy" in out


# The branch database of `--staff db`, unreachable: a closed port on this host, a password that must not show.
_NO_DB = {**_ENV, "GUARD_BRANCH_DSN": "postgresql://guard:s3cret-not-shown@127.0.0.1:9/branch_0101"}


def test_an_unreadable_staff_database_is_named_not_blamed_on_the_principal(policy_dir: Path) -> None:
    """With staff from the branch database and the database down, an unknown principal is refused because it
    could not be checked, and the message says so: not that the policy lacks it (it may be in the database)."""
    result = CliRunner().invoke(main, ["reveal", "token", "create", "--policy", str(policy_dir), "--staff", "db",
                                       "--principal", "Staff::t0101-01"], env=_NO_DB)
    assert result.exit_code == 1
    assert "could not be checked" in result.output
    assert "staff entities could not be read from the branch database" in result.output
    assert "not an entity of the policy" not in result.output
    assert "s3cret-not-shown" not in result.output and "bgr_" not in result.output


def test_a_principal_of_entities_json_passes_although_the_staff_database_is_down(policy_dir: Path) -> None:
    result = CliRunner().invoke(main, ["reveal", "token", "create", "--policy", str(policy_dir), "--staff", "db",
                                       "--principal", "Staff::m1"], env=_NO_DB)
    assert "could not be checked" not in result.output and "not an entity" not in result.output


def test_policy_check_warns_that_staff_could_not_be_read(policy_dir: Path) -> None:
    result = CliRunner().invoke(main, ["policy", "check", "--dir", str(policy_dir), "--staff", "db",
                                       "--principal", "Staff::t0101-01", "--action", "reveal",
                                       "--resource", 'DataSubject::"0101:7"'], env=_NO_DB)
    assert result.exit_code == 3, result.output  # denied
    assert "warning: staff entities could not be read from the branch database" in result.output
    assert "s3cret-not-shown" not in result.output


def test_a_missing_policy_directory_says_so(tmp_path: Path) -> None:
    code, out = _create(tmp_path / "nowhere", "--principal", "Staff::m1")
    assert code == 1 and "does not exist" in out and "Traceback" not in out
