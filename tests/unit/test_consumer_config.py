"""The worker's consumer settings that bound its memory (`Settings.prefetch_kb`); the bound itself is
checked on the real broker by tests/integration/test_prefetch.py."""

from __future__ import annotations

import pytest

from guard.config import Settings
from guard.errors import ConfigError
from guard.kafka.clients import PREFETCH_KB_MAX, PREFETCH_KB_MIN, consumer_config


def test_the_prefetch_bound_reaches_librdkafka_with_a_short_back_off() -> None:
    conf = consumer_config(Settings(prefetch_kb=4096), "w")
    assert conf["queued.max.messages.kbytes"] == 4096
    # past the bound a partition's next fetch waits this long (librdkafka's 1 s starved the plain loop)
    assert conf["fetch.queue.backoff.ms"] <= 50
    assert consumer_config(Settings(), "w")["queued.max.messages.kbytes"] == 16384


@pytest.mark.parametrize("kb", [0, PREFETCH_KB_MIN - 1, PREFETCH_KB_MAX + 1])
def test_a_prefetch_bound_out_of_range_is_refused_with_the_setting_named(kb: int) -> None:
    with pytest.raises(ConfigError, match="GUARD_PREFETCH_KB"):
        consumer_config(Settings(prefetch_kb=kb), "w")
