"""The order of a commit's steps (`SanitizerWorker._commit`): the batch's remaining activity goes to the key
store first, so it is written while the commit does its other work, and every activity write is waited for
before the offsets and the commit go to the transaction: no record commits before the key store knows where
its ciphertexts went (an erasure's confirmation names those topics). Fakes: the order of calls is the logic
under test; tests/integration/test_native_path.py and test_erasure.py check what a real worker writes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from guard.kafka.runner import SanitizerWorker


def fake_worker(*, stale: set[str] | None = None) -> tuple[Any, list[str]]:
    log: list[str] = []

    def step(name: str, value: Any = None) -> Any:
        def call(*_: Any, **__: Any) -> Any:
            log.append(name)
            return value
        return call

    store = SimpleNamespace(commit_view=step("commit view", (1, True)), root_changed=step("root changed", ([], [])))
    sanitizer = SimpleNamespace(
        branch="0101", subject_activity={("s1", "sanitized.t"): None}, pending_in_txn=[],
        keys=SimpleNamespace(store=store, erased_since=step("erased since", stale or set())),
        send_activity=step("send activity"), activity_written=step("activity written"),
        take_erasure_schedules=step("take schedules", {}), root_changes=step("root changes", []),
        take_expiries=step("take expiries", {}))
    worker = SimpleNamespace(
        _in_txn=True, _last={("raw.t", 0): 41}, _txn_mark=0, _txn_pool=None, producer=None, consumer=None,
        sanitizer=sanitizer, batch=SimpleNamespace(by_table_decision={}, fields={}, dlq=0, records_out=0,
                                                   timestamps_ms=[], events=1),
        chains=SimpleNamespace(checkpoints=step("checkpoints", []), metadata=step("tails", {("raw.t", 0): ""})),
        _produce_checkpoints=step("produce checkpoints"),
        _early_offsets=SimpleNamespace(send=step("offsets sent early")),
        _early_offsets_cover_batch=step("offsets covered", True),
        _txn=lambda what, _call: log.append(what),
        _abort=step("abort"), _confirm_delivered=step("confirm delivered"), _chains_committed=step("chains committed"),
        stats=SimpleNamespace(merge=step("stats"), erased_during_txn=0),
        telemetry=SimpleNamespace(on_commit=step("telemetry")), _reset_batch=step("reset batch"), _on_batch=None)
    return worker, log


def test_the_activity_is_sent_first_and_written_before_the_commit():
    worker, log = fake_worker()
    SanitizerWorker._commit(worker)
    assert log[0] == "send activity", "the rest of the batch's activity goes out before the commit's other work"
    assert log.index("activity written") < log.index("commit"), "no record commits before its activity is written"
    assert log.index("send activity", 1) < log.index("activity written"), "anything added meanwhile is sent too"


def test_a_transaction_with_an_erased_subject_aborts_before_waiting_for_its_activity():
    worker, log = fake_worker(stale={"s1"})
    SanitizerWorker._commit(worker)
    assert log[0] == "send activity" and "abort" in log
    assert "commit" not in log and "activity written" not in log
