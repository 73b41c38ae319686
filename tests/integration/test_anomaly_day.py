"""Issue 15, "How it will be checked": a compressed day of synthetic branch traffic the tests never saw (a new
random seed each run, printed), with a handful of planted abuses, played through the live stack by
`guard alerts rehearse`: the facts topic, one analyzer worker as the `analyzer` Kafka principal, Redis, the
alerts topic. Each planted abuse must raise exactly one alert of its rule; the normal traffic none.

What the day's facts stand for is tested from their real producers elsewhere: reveal calls
(test_anomaly_reveal.py), the branch database through the sanitizer (test_anomaly_db.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from guard.stack.config import StackConfig
from tests.integration.kafka_helpers import REPO, admin_redis_env

pytestmark = pytest.mark.integration


def test_a_day_with_planted_abuses_raises_exactly_their_alerts(stack: dict[str, str]) -> None:
    seed = random.SystemRandom().randrange(1, 1_000_000_000)
    env = {**os.environ, **stack, **StackConfig.from_env().kafka_env("analyzer"), **admin_redis_env(stack),
           "PYTHONPATH": str(REPO)}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "guard.cli", "alerts", "rehearse", "--seed", str(seed)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr[-3000:], f"(took {time.monotonic() - began:.0f} s)")
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert f"PASS seed {seed}:" in done.stdout and ", 0 unexpected" in done.stdout
    assert "BAD" not in done.stdout
