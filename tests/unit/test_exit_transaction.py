"""At exit the open transaction is committed after a stop and aborted after an unexpected error
(`SanitizerWorker._end_open_transaction`): a native run that produced records and then raised left a batch
half done, and the final commit wrote those outputs without their input offsets, so the restarted worker
wrote them again. Fakes: the order of calls is the logic under test."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from guard.kafka.runner import SanitizerWorker


def _reset(kw: dict[str, Any]) -> str:
    """How the chains were reset: after a failed side transaction its commit may have gone through."""
    return "chains reset" if kw == {"outcome_unknown": True} else f"chains reset {kw}"


def fake_worker(log: list[str]) -> Any:
    worker = SimpleNamespace(
        _in_txn=True,
        producer=SimpleNamespace(abort_transaction=lambda _timeout: log.append("abort")),
        chains=SimpleNamespace(reset=lambda **kw: log.append(_reset(kw))),
        _txn=lambda _what, call, **_kw: call(),
        _commit=lambda: log.append("commit"),
        _replace_producer=lambda: log.append("producer replaced"),
    )
    worker._abort_side_transaction = lambda: SanitizerWorker._abort_side_transaction(worker)  # type: ignore[arg-type]
    return worker


def test_a_stopped_worker_commits_its_open_transaction():
    log: list[str] = []
    SanitizerWorker._end_open_transaction(fake_worker(log), True)  # type: ignore[arg-type]
    assert log == ["commit"]


def test_a_worker_ended_by_an_unexpected_error_aborts_its_open_transaction():
    log: list[str] = []
    worker = fake_worker(log)
    SanitizerWorker._end_open_transaction(worker, False)  # type: ignore[arg-type]
    assert log == ["chains reset", "abort"], "half a batch must not commit without its offsets"
    assert worker._in_txn is False


def test_nothing_to_end_without_a_transaction():
    log: list[str] = []
    worker = fake_worker(log)
    worker._in_txn = False
    SanitizerWorker._end_open_transaction(worker, False)  # type: ignore[arg-type]
    assert log == []
