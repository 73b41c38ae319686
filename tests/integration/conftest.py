"""Fixtures for tests that need the real local stack (Kafka, Connect/Debezium, PostgreSQL, Redis)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """Start the local stack once per session (idempotent: reuses a running one); returns env()."""
    from guard.stack import env, up

    up()
    return env()
