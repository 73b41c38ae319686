"""Unit tests cover pure logic: none of them may read the local stack's files (its CA, its secrets).

Every unit test runs with `GUARD_STACK_HOME` pointing at a directory that does not exist, so a test that reads
the stack's files by way of a setting's default fails on every machine, not only on a fresh one where
`guard stack up` has not run yet (as `test_consumer_config.py` did until its tests brought their own files).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_local_stack(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("GUARD_STACK_HOME", str(tmp_path_factory.getbasetemp() / "no-local-stack"))
    assert not Path(str(tmp_path_factory.getbasetemp() / "no-local-stack")).exists()
