"""`guard erase` writes an erasure's records in one Kafka transaction, with doubles for the sanitizer, the key
store and the producer (no stack; tests/integration/test_erasure.py has the real one).

Found by review: the command wrote the deletion confirmation, its audit record and the tombstones for compacted
topics with a plain producer. A tombstone whose partition had no leader for longer than the flush failed the
command while the confirmation had landed; a worker then found the confirmation's id on guard.deletions and
forgot the pending entry (`Maintenance.redeliver_pending`), so the tombstone and the audit record were never
written while the confirmation said they were. Now: one transaction, committed before the pending entry is
forgotten; any failure aborts it, nothing is committed, and the entry stays pending for the workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from guard.config import Settings
from guard.erasure import service
from guard.errors import GuardError
from guard.records.builders import OutRecord

SETTINGS = dataclasses.replace(Settings(), branch="0101", kafka_username="guard")
COMPACTED = "sanitized.br0101.public.profiles"


class FakeStore:
    """The key store's part `guard erase` calls: the shred's pending entry, removed only by `confirm_delivered`."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}
        self.confirmed: list[dict[str, str]] = []

    def confirm_delivered(self, branch: str, carried: dict[str, str]) -> None:
        self.confirmed.append(dict(carried))
        for subject in carried:
            self.pending.pop(subject, None)

    def pending_confirmation(self, branch: str, subject: str) -> bytes | None:
        return b"{}" if subject in self.pending else None

    def erased_record(self, branch: str, subject: str) -> bytes | None:
        return None

    def compact(self) -> None:
        pass

    def put_audit_checkpoints(self, topic: str, notes: list[Any]) -> None:
        pass


class FakeSanitizer:
    """`Sanitizer.erase` as it behaves after a shred: the confirmation, its audit record and one tombstone for a
    compacted topic, all stored pending with the shred."""

    def __init__(self) -> None:
        self.store = FakeStore()
        self.keys = SimpleNamespace(store=self.store, subject_token=lambda branch, cid: f"tok-{cid}")
        self.emitter = SimpleNamespace(signer=None)
        self.branch = SETTINGS.branch
        self.owner = ""
        self.pending_in_txn: dict[str, str] = {}
        self.erased: list[str] = []

    def erase(self, subject: str, **_: Any) -> list[OutRecord]:
        self.erased.append(subject)
        self.store.pending[subject] = "c-1"
        self.pending_in_txn[subject] = "c-1"
        confirmation = orjson.dumps({"type": "deletion_confirmation", "id": "c-1", "subject": subject,
                                     "outcome": "shredded", "keys_destroyed": ["dek/0101/x/v1"]})
        return [OutRecord(SETTINGS.deletions_topic, subject.encode(), confirmation),
                OutRecord(SETTINGS.audit_topic, b"audit", b"audit record"),
                OutRecord(COMPACTED, b'{"id": "p1"}', None, 1)]


@dataclasses.dataclass
class Msg:
    rec: tuple[str, bytes | None, bytes | None, int]

    def topic(self) -> str:
        return self.rec[0]

    def partition(self) -> int:
        return self.rec[3]


class FakeProducer:
    """A producer with Kafka's visibility for `read_committed` readers: a record delivered outside a
    transaction is visible at once; inside one, only once the transaction is committed. `fail(rec)` gives a
    record's delivery error; `commit_error` fails the commit."""

    made: list[FakeProducer] = []

    def __init__(self, conf: dict[str, Any], *, fail: Callable[[tuple[Any, ...]], KafkaError | None] = lambda r: None,
                 commit_error: KafkaError | None = None, init_error: KafkaError | None = None) -> None:
        self.conf = conf
        self.fail, self.commit_error, self.init_error = fail, commit_error, init_error
        self.in_txn = False
        self.queued: list[tuple[tuple[Any, ...], Any]] = []
        self.in_open_txn: list[tuple[Any, ...]] = []
        self.visible: list[tuple[Any, ...]] = []
        self.calls: list[str] = []
        FakeProducer.made.append(self)

    def init_transactions(self, timeout: float) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise KafkaException(self.init_error)

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self.in_txn = True

    def produce(self, topic: str, value: bytes | None, key: bytes | None, *, partition: int = -1,
                timestamp: int = 0, on_delivery: Callable[..., None], headers: Any = None) -> None:
        self.queued.append(((topic, key, value, partition), on_delivery))

    def flush(self, timeout: float) -> int:
        for rec, on_delivery in self.queued:
            err = self.fail(rec)
            on_delivery(err, Msg(rec))
            if err is None:
                (self.in_open_txn if self.in_txn else self.visible).append(rec)
        self.queued = []
        return 0

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        self.visible += self.in_open_txn
        self.in_open_txn, self.in_txn = [], False

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self.in_open_txn, self.in_txn = [], False


@pytest.fixture
def sanitizer(monkeypatch: pytest.MonkeyPatch) -> FakeSanitizer:
    fake = FakeSanitizer()
    monkeypatch.setattr(service, "erasure_sanitizer", lambda settings: fake)
    monkeypatch.setattr(service, "client_config", lambda settings, **extra: dict(extra))
    FakeProducer.made = []
    return fake


def _producer(monkeypatch: pytest.MonkeyPatch, **behaviour: Any) -> None:
    monkeypatch.setattr(service, "Producer", lambda conf: FakeProducer(conf, **behaviour))


def test_a_tombstone_that_is_not_delivered_leaves_nothing_committed_and_the_entry_pending(
        sanitizer: FakeSanitizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tombstone's partition has no leader: the confirmation and the audit record were delivered, but
    nothing of the erasure is visible, the transaction is aborted, and the pending entry stays."""
    _producer(monkeypatch, fail=lambda rec: KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)
              if rec[2] is None else None)
    with pytest.raises(GuardError) as err:
        service.erase_subject(SETTINGS, "42", "subject_request", "dpo@bank")
    [producer] = FakeProducer.made
    assert producer.visible == [], "a record of the erasure was committed without the others"
    assert producer.calls[-1] == "abort" and "commit" not in producer.calls
    assert sanitizer.store.pending == {"tok-42": "c-1"} and sanitizer.store.confirmed == []
    message = str(err.value)
    assert f"{COMPACTED} [1]" in message and "kept in the key store" in message and "1 tombstone" in message
    assert "guard doctor" in message and "guard run" in message, "the error says what to do"


def test_a_failed_commit_leaves_nothing_committed_and_the_entry_pending(
        sanitizer: FakeSanitizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record delivered, the commit refused (the coordinator fenced or aborted the transaction)."""
    _producer(monkeypatch, commit_error=KafkaError(KafkaError.INVALID_TXN_STATE))
    with pytest.raises(GuardError, match="were not committed"):
        service.erase_subject(SETTINGS, "42", "subject_request", "dpo@bank")
    [producer] = FakeProducer.made
    assert producer.visible == [] and producer.calls == ["init", "begin", "commit", "abort"]
    assert sanitizer.store.pending == {"tok-42": "c-1"} and sanitizer.store.confirmed == []


def test_the_erasures_records_are_committed_together_before_the_pending_entry_is_forgotten(
        sanitizer: FakeSanitizer, monkeypatch: pytest.MonkeyPatch) -> None:
    forgotten_at: list[int] = []
    real_confirm = sanitizer.store.confirm_delivered

    def confirm(branch: str, carried: dict[str, str]) -> None:
        forgotten_at.append(len(FakeProducer.made[0].visible))
        real_confirm(branch, carried)

    monkeypatch.setattr(sanitizer.store, "confirm_delivered", confirm)
    _producer(monkeypatch)
    confirmation = service.erase_subject(SETTINGS, "42", "subject_request", "dpo@bank")
    [producer] = FakeProducer.made
    assert confirmation["id"] == "c-1" and producer.calls == ["init", "begin", "commit"]
    assert [r[0] for r in producer.visible] == [SETTINGS.deletions_topic, SETTINGS.audit_topic, COMPACTED]
    assert forgotten_at == [3], "the pending entry was forgotten before the commit"
    assert sanitizer.store.pending == {}
    # The run's own transactional id, under the workers' prefix (the ACL the guard principal has), and the
    # deployment's transaction timeout (a worker takes a pending entry over only after it, plus a margin).
    tid = producer.conf["transactional.id"]
    assert tid.startswith(f"{SETTINGS.group_id}-erase-") and tid.endswith(sanitizer.owner.split("#")[1])
    assert producer.conf["transaction.timeout.ms"] == SETTINGS.transaction_timeout_ms


def test_a_transactional_id_kafka_refuses_names_the_missing_acl_and_nothing_is_erased(
        sanitizer: FakeSanitizer, monkeypatch: pytest.MonkeyPatch) -> None:
    _producer(monkeypatch, init_error=KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED))
    with pytest.raises(GuardError) as err:
        service.erase_subject(SETTINGS, "42", "subject_request", "dpo@bank")
    message = str(err.value)
    assert "User:guard WRITE and DESCRIBE on TRANSACTIONAL_ID, pattern PREFIXED" in message
    assert f"'{SETTINGS.group_id}-erase-'" in message and "Nothing was erased" in message
    assert sanitizer.erased == [], "the key was destroyed although its records could not be written"
