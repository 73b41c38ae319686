"""Fixtures for tests that need the real local stack (Kafka, Connect/Debezium, PostgreSQL, Redis)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """Start the local stack once per session (idempotent: reuses a running one); returns env()."""
    import os

    from guard.stack import env, up

    up()
    found = env()
    # access (issue 20): in-process clients (load_settings, redis_client, rest_auth) find the credential
    # files the way a shell after `eval "$(guard stack env)"` would; these are paths, not secrets
    for name in ("GUARD_REDIS_PASSWORD_FILE", "GUARD_CONNECT_CREDENTIALS_FILE"):
        os.environ[name] = found[name]
    return found
