"""Fixtures for tests that need the real local stack (Kafka, Connect/Debezium, PostgreSQL, Redis)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """Start the local stack once per session (idempotent: reuses a running one); returns env().

    Kafka is reached as the admin principal (issue 20: tests use the admin unless they test a principal):
    the returned variables name the admin's password file, and so does this process's environment, so that
    settings loaded in-process and the guard workers tests start as subprocesses connect as admin too.
    Redis and Connect REST: the guard's own user and the stack's REST user, found through the credential
    files `guard stack env` names (paths, not secrets), as a shell after `eval "$(guard stack env)"` would.
    """
    from guard.stack import env, up
    from guard.stack.config import StackConfig

    up()
    found = env()
    for name in ("GUARD_REDIS_PASSWORD_FILE", "GUARD_CONNECT_CREDENTIALS_FILE"):
        os.environ[name] = found[name]
    # the deployment's guard principal stays User:guard: `guard doctor` run as admin checks it reads raw alone
    admin = StackConfig.from_env().kafka_env("admin")
    os.environ.update({**admin, "GUARD_KAFKA_GUARD_PRINCIPAL": "User:guard"})
    return {**found, **admin}


@pytest.fixture(scope="session")
def catalog_without_grace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalog with every erasure's grace period at 0 s instead of 30 s: for tests of an erasure's
    outcome, not of its grace period (test_erasure.py tests that), which would otherwise wait it out."""
    text = (REPO / "schemas" / "catalog.toml").read_text(encoding="utf-8")
    assert "grace_s = 30" in text, "the catalog's grace periods changed: update this fixture"
    path = tmp_path_factory.mktemp("catalog") / "catalog.toml"
    path.write_text(text.replace("grace_s = 30", "grace_s = 0"), encoding="utf-8")
    return path
