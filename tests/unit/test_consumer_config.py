"""The worker's consumer settings that bound its memory (`Settings.prefetch_kb`); the bound itself is
checked on the real broker by tests/integration/test_prefetch.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.config import Settings
from guard.errors import ConfigError
from guard.kafka.clients import PREFETCH_KB_MAX, PREFETCH_KB_MIN, consumer_config


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """A password file and a CA file of the test's own: a unit test reads nothing of the local stack's."""
    password, ca = tmp_path / "kafka.password", tmp_path / "ca.crt"
    password.write_text("secret\n")
    password.chmod(0o600)
    ca.write_text("not read: librdkafka only gets its path\n")
    return {"kafka_password_file": str(password), "kafka_ca_file": str(ca)}


def test_the_prefetch_bound_reaches_librdkafka_with_a_short_back_off(credentials: dict[str, str]) -> None:
    conf = consumer_config(Settings(prefetch_kb=4096, **credentials), "w")
    assert conf["queued.max.messages.kbytes"] == 4096
    # past the bound a partition's next fetch waits this long (librdkafka's 1 s starved the plain loop)
    assert conf["fetch.queue.backoff.ms"] <= 50
    assert consumer_config(Settings(**credentials), "w")["queued.max.messages.kbytes"] == 16384


@pytest.mark.parametrize("kb", [0, PREFETCH_KB_MIN - 1, PREFETCH_KB_MAX + 1])
def test_a_prefetch_bound_out_of_range_is_refused_with_the_setting_named(kb: int, credentials: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="GUARD_PREFETCH_KB"):
        consumer_config(Settings(prefetch_kb=kb, **credentials), "w")
