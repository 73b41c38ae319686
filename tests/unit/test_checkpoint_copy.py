"""The copy of committed audit checkpoints to the second store is sent after the commit and its reply read at
the next copy or when the worker stops (`SanitizerWorker._chains_committed`): nobody waits on it, and a
failed copy is logged, never raised (the topic has the checkpoints). Fakes: the order of calls is the logic
under test; tests/integration/test_audit_chain.py checks the copies a real worker leaves in Redis."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from guard.errors import KeyUnavailableError
from guard.kafka.runner import SanitizerWorker


class Reply:
    def __init__(self, log: list[str], name: str, fails: bool = False) -> None:
        self.log, self.name, self.fails = log, name, fails

    def result(self) -> int:
        self.log.append(f"read {self.name}")
        if self.fails:
            raise KeyUnavailableError("key store unreachable (ConnectionError)")
        return 1


def fake_worker(batches: list[list[tuple[str, int, str]]], fails: set[int]) -> tuple[Any, list[str]]:
    log: list[str] = []
    sent = iter(range(len(batches)))

    def send(topic: str, notes: list[tuple[str, int, str]]) -> Reply:
        n = next(sent)
        log.append(f"send {n} ({len(notes)} to {topic})")
        return Reply(log, str(n), n in fails)

    notes = iter(batches)
    worker = SimpleNamespace(
        _checkpoint_copy=None, settings=SimpleNamespace(audit_topic="guard.audit"),
        chains=SimpleNamespace(committed=lambda: next(notes)),
        sanitizer=SimpleNamespace(keys=SimpleNamespace(store=SimpleNamespace(send_audit_checkpoints=send))))
    worker._checkpoint_copy_done = lambda: SanitizerWorker._checkpoint_copy_done(worker)  # type: ignore[arg-type]
    return worker, log


def test_each_copy_is_read_at_the_next_one_and_when_the_worker_stops():
    worker, log = fake_worker([[("c", 1, "n1")], [], [("c", 2, "n2"), ("d", 1, "n3")]], set())
    SanitizerWorker._chains_committed(worker)  # type: ignore[arg-type]
    assert log == ["send 0 (1 to guard.audit)"], "the commit does not wait for the copy"
    SanitizerWorker._chains_committed(worker)  # type: ignore[arg-type]
    assert log[1:] == ["read 0"] and worker._checkpoint_copy is None
    SanitizerWorker._chains_committed(worker)  # type: ignore[arg-type]
    SanitizerWorker._checkpoint_copy_done(worker)  # type: ignore[arg-type]  # the worker stops
    assert log[2:] == ["send 1 (2 to guard.audit)", "read 1"]
    SanitizerWorker._checkpoint_copy_done(worker)  # type: ignore[arg-type]
    assert len(log) == 4, "a reply is read once"


def test_a_failed_copy_is_logged_with_its_count_and_the_worker_goes_on(caplog):
    worker, log = fake_worker([[("c", 1, "n1"), ("c", 2, "n2")], [("c", 3, "n3")]], {0})
    SanitizerWorker._chains_committed(worker)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="guard.runner"):
        SanitizerWorker._chains_committed(worker)  # type: ignore[arg-type]
    assert log == ["send 0 (2 to guard.audit)", "read 0", "send 1 (1 to guard.audit)"]
    assert "2 audit checkpoints not copied to the second store" in caplog.text and "guard.audit" in caplog.text
