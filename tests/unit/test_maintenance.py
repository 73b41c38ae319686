"""A side transaction Kafka fails is ended by its writer (`SanitizerWorker._side_transaction`), which raises
`SideTransactionFailed`; the maintenance round (`guard.kafka.maintenance`) then leaves what it carried pending
and goes on. Fakes: the order of calls is the logic under test; tests/integration/test_erasure.py checks
erasures and confirmations on the real stack, through crashes."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from guard.kafka.maintenance import Maintenance, SideTransactionFailed
from guard.kafka.runner import ProducerStuckError, SanitizerWorker


def _reset(kw: dict[str, Any]) -> str:
    """How the chains were reset: after a failed side transaction its commit may have gone through."""
    return "chains reset" if kw == {"outcome_unknown": True} else f"chains reset {kw}"


def fake_worker(log: list[str], *, commit_fails: Exception | None = None, abort_fails: bool = False) -> Any:
    def commit(_timeout: float) -> None:
        log.append("commit")
        if commit_fails is not None:
            raise commit_fails

    def abort(_timeout: float) -> None:
        log.append("abort")
        if abort_fails:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    worker = SimpleNamespace(
        _in_txn=False,
        producer=SimpleNamespace(begin_transaction=lambda: log.append("begin"), commit_transaction=commit,
                                 abort_transaction=abort),
        chains=SimpleNamespace(checkpoints=lambda: ["checkpoint"], reset=lambda **kw: log.append(_reset(kw))),
        _produce_own=lambda rec: log.append(f"produce {rec}"),
        _produce_checkpoints=lambda recs: log.append(f"checkpoints {len(recs)}"),
        _txn=lambda _what, call, **_kw: call(),
        _chains_committed=lambda: log.append("chains committed"),
        _replace_producer=lambda: log.append("producer replaced"),
    )
    worker._abort_side_transaction = lambda: SanitizerWorker._abort_side_transaction(worker)  # type: ignore[arg-type]
    return worker


def test_a_committed_side_transaction_hands_its_checkpoints_on():
    log: list[str] = []
    worker = fake_worker(log)
    SanitizerWorker._side_transaction(worker, ["r1", "r2"])  # type: ignore[arg-type]
    assert log == ["begin", "produce r1", "produce r2", "checkpoints 1", "commit", "chains committed"]
    assert worker._in_txn is False


@pytest.mark.parametrize("failure", [KafkaException(KafkaError(KafkaError._FENCED)),
                                     ProducerStuckError("commit still unanswered after 10 s")])
def test_a_failed_side_transaction_is_ended_before_the_failure_is_raised(failure: Exception):
    log: list[str] = []
    worker = fake_worker(log, commit_fails=failure)
    with pytest.raises(SideTransactionFailed) as raised:
        SanitizerWorker._side_transaction(worker, ["r1"])  # type: ignore[arg-type]
    assert raised.value.__cause__ is failure
    assert log == ["begin", "produce r1", "checkpoints 1", "commit", "chains reset", "abort"]
    assert worker._in_txn is False, "the next transaction must be able to begin"


def test_a_side_transaction_that_cannot_abort_replaces_the_producer():
    log: list[str] = []
    worker = fake_worker(log, commit_fails=KafkaException(KafkaError(KafkaError._TIMED_OUT)), abort_fails=True)
    with pytest.raises(SideTransactionFailed):
        SanitizerWorker._side_transaction(worker, [])  # type: ignore[arg-type]
    assert log[-2:] == ["abort", "producer replaced"] and worker._in_txn is False


def fake_maintenance(log: list[str], write_fails: bool, *, more: bool = True) -> Maintenance:
    carried = {"subject-1": "confirmation-1"}

    def run_due_erasures(limit: int) -> tuple[list[str], bool]:
        log.append(f"erasures due, at most {limit}")
        sanitizer.pending_in_txn.update(carried)
        return ["tombstone", "confirmation"], more

    def write(records: list[Any]) -> None:
        log.append(f"write {len(records)}")
        if write_fails:
            raise SideTransactionFailed("commit still unanswered after 10 s")

    store = SimpleNamespace(confirm_delivered=lambda branch, entries: log.append(f"delivered {sorted(entries)}"))
    sanitizer = SimpleNamespace(pending_in_txn={}, run_due_erasures=run_due_erasures, branch="0101",
                                keys=SimpleNamespace(store=store))
    settings = SimpleNamespace(erasures_per_transaction=16)
    return Maintenance(settings, sanitizer, SimpleNamespace(), write=write)  # type: ignore[arg-type]


def test_erasures_written_confirm_their_deliveries_and_say_whether_more_wait():
    log: list[str] = []
    upkeep = fake_maintenance(log, write_fails=False)
    upkeep.run_due_erasures()
    assert log == ["erasures due, at most 16", "write 2", "delivered ['subject-1']"]
    assert upkeep.erasures_waiting is True and upkeep.sanitizer.pending_in_txn == {}


def test_erasures_whose_transaction_failed_stay_pending_and_the_round_goes_on(caplog):
    log: list[str] = []
    upkeep = fake_maintenance(log, write_fails=True)
    with caplog.at_level(logging.WARNING, logger="guard.runner"):
        upkeep.run_due_erasures()  # raises nothing: the next round tries again
    assert log == ["erasures due, at most 16", "write 2"], "nothing may be confirmed delivered"
    assert upkeep.erasures_waiting is False, "a failure waits for the next maintenance round"
    assert upkeep.sanitizer.pending_in_txn == {}, "the next transaction must not carry them as its own"
    assert "confirmations not delivered yet" in caplog.text and "they stay pending" in caplog.text


def test_a_pending_confirmation_another_worker_claimed_first_is_not_re_emitted(monkeypatch):
    from guard.kafka import maintenance

    log: list[str] = []
    entry = {"id": "c-1", "at_ms": 1, "owner": "cli:dpo#1", "claimed_ms": 1,
             "records": [["guard.deletions", None, "", None]]}
    raw = orjson.dumps(entry)
    monkeypatch.setattr(maintenance, "client_config", lambda _settings: {})
    monkeypatch.setattr(maintenance.confirmations, "delivered", lambda *_args: set())  # not on the topic yet
    claims: list[dict[str, tuple[bytes, bytes]]] = []

    def claim_pending(branch: str, wanted: dict[str, tuple[bytes, bytes]]) -> set[str]:
        claims.append(wanted)
        return set()  # another worker's claim came first: the entry is no longer as read

    store = SimpleNamespace(pending_confirmations=lambda branch: {"s1": raw}, claim_pending=claim_pending,
                            confirm_delivered=lambda branch, entries: log.append(f"delivered {sorted(entries)}"))
    sanitizer = SimpleNamespace(pending_in_txn={}, owner="worker-b#2", keys=SimpleNamespace(store=store))
    settings = SimpleNamespace(branch="0101", transaction_timeout_ms=60_000)
    upkeep = Maintenance(settings, sanitizer, SimpleNamespace(confirmations_redelivered=0),  # type: ignore[arg-type]
                         write=lambda records: log.append(f"write {len(records)}"))
    upkeep.redeliver_pending()
    [wanted] = claims
    assert wanted["s1"][0] == raw and orjson.loads(wanted["s1"][1])["owner"] == "worker-b#2"
    assert log == ["delivered []"], "only the worker that claimed it re-emits it"
