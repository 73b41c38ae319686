"""The write checker without Kafka: principals of changes, the raw-bytes scan of the native path against the
decoded event, the attribution messages, the memo dropped with the policy's generation."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

import orjson
import pytest

from guard.cdc.envelope import decode_value
from guard.config import load_settings
from guard.pipeline.policy import NOT_A_WRITE, AttributionPending, WriteChecker, message_principal, principal_uid
from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities

STAFF = staff_entities([("t1", "0101", "bank-a", True, ["teller"]), ("m1", "0101", "bank-a", True, ["manager"])])


class Attributions:
    """The key store's attribution sets, in memory (the real ones: tests/integration/test_policy.py)."""

    def __init__(self) -> None:
        self.exchanges = 0  # round trips of `exchange_attributions`
        self.singles = 0  # round trips of `record_attribution` and `attributions`
        self.sets: dict[int, set[str]] = {}

    def record_attribution(self, branch: str, tx_id: int, principal: str) -> None:
        self.singles += 1
        self.sets.setdefault(tx_id, set()).add(principal)

    def attributions(self, branch: str, tx_ids: list[int]) -> dict[int, set[str]]:
        self.singles += 1
        return {t: set(self.sets[t]) for t in tx_ids if t in self.sets}

    def exchange_attributions(self, branch: str, recorded: Iterable[tuple[int, str]],
                              wanted: Iterable[int]) -> dict[int, set[str]]:
        self.exchanges += 1
        for tx_id, principal in recorded:
            self.sets.setdefault(tx_id, set()).add(principal)
        return {t: set(self.sets[t]) for t in wanted if t in self.sets}


@pytest.fixture
def checker() -> WriteChecker:
    settings = load_settings(None, branch="0101", policy_staff="file", attribution_wait_s=0.5)
    return WriteChecker(settings, PolicyEngine(default_directory(), entity_source=lambda: STAFF),
                        Attributions())  # type: ignore[arg-type]


def event(op: str, principal: object = "Staff:t1", **extra: object) -> bytes:
    row = {"customer_id": 1, "name": "x", "updated_by": principal, **extra}
    doc = {"before": row if op in ("u", "d") else None, "after": None if op == "d" else row,
           "source": {"connector": "postgresql", "db": "b", "schema": "public", "table": "customers",
                      "ts_ms": 1_800_000_000_000, "txId": 77, "lsn": 5}, "op": op, "ts_ms": 1_800_000_000_500}
    return orjson.dumps(doc)


def test_principal_forms() -> None:
    assert principal_uid("Staff:t1") == ("Staff", "t1")
    assert principal_uid("Service:eod-batch") == ("Service", "eod-batch")
    assert principal_uid("t1") == ("Staff", "t1")
    assert principal_uid("Admin:root") is None and principal_uid("") is None


@pytest.mark.parametrize("op,principal,expected", [
    ("c", "Staff:t1", "allow"), ("u", "Staff:t1", "allow"), ("c", "Staff:nobody", "deny"),
    ("c", None, "unattributed"), ("c", "Root:x", "unattributed")])
def test_the_scan_decides_as_the_decoded_event(checker: WriteChecker, op: str, principal: object,
                                               expected: str) -> None:
    raw = event(op, principal)
    scanned = checker.scan(raw, "public.customers")
    assert scanned is not None
    decoded = checker.decide_event(decode_value(raw), ("t", 0, 1))  # type: ignore[arg-type]
    assert scanned == (op, decoded) and decoded is not None and decoded.decision == expected


def test_the_scan_reads_the_after_image_and_declines_what_it_cannot_read(checker: WriteChecker) -> None:
    # an update whose before image was by someone else: the after image's principal counts
    raw = orjson.loads(event("u", "Staff:t1"))
    raw["before"]["updated_by"] = "Staff:nobody"
    found = checker.scan(orjson.dumps(raw), "public.customers")
    assert found is not None and found[1].principal == "Staff:t1"
    assert checker.scan(event("r"), "public.customers") == ("r", NOT_A_WRITE)
    assert checker.scan(event("d"), "public.customers") is None  # deletes are joined with their message
    assert checker.scan(event("c", 'Staff:"t1"'), "public.customers") is None  # an escape: decoded instead
    assert checker.scan(event("c", 5), "public.customers") is None  # not a string
    # a value that merely contains the key's text doesn't fool it (its quotes are escaped in JSON)
    sneaky = event("c", None, name='"updated_by":"Staff:m1"')
    found = checker.scan(sneaky, "public.customers")
    assert found is not None and found[1].decision == "unattributed"


def test_a_delete_waits_for_its_message_then_is_unattributed(checker: WriteChecker) -> None:
    import time

    delete = decode_value(event("d"))
    assert delete is not None
    with pytest.raises(AttributionPending):
        checker.decide_event(delete, ("t", 0, 9))
    time.sleep(0.6)
    late = checker.decide_event(delete, ("t", 0, 9))
    assert late is not None and late.decision == "unattributed" and "0.5 s" in late.reason
    # the message arrives: the delete is its principal's; two principals in one transaction: nobody's
    store = checker.store
    store.record_attribution("0101", 77, "Staff:m1")  # type: ignore[union-attr]
    attributed = checker.decide_event(delete, ("t", 0, 11))
    assert attributed is not None and attributed.decision == "allow" and attributed.principal == "Staff:m1"
    store.record_attribution("0101", 77, "Staff:t1")  # type: ignore[union-attr]
    assert checker.decide_event(delete, ("t", 0, 12)).decision == "unattributed"  # type: ignore[union-attr]
    no_tx = decode_value(event("d"))
    assert no_tx is not None
    no_tx.tx_id = None
    assert checker.decide_event(no_tx, ("t", 0, 10)).decision == "unattributed"  # type: ignore[union-attr]


def test_attribution_messages() -> None:
    def msg(content: object, prefix: str = "guard.principal") -> bytes:
        text = base64.b64encode(json.dumps(content).encode()).decode() if not isinstance(content, str) else content
        return orjson.dumps({"op": "m", "ts_ms": 1, "message": {"prefix": prefix, "content": text},
                             "source": {"connector": "postgresql", "db": "b", "txId": 5, "lsn": 1}})
    assert message_principal(decode_value(msg({"principal": "Staff:m1"}))) == "Staff:m1"  # type: ignore[arg-type]
    assert message_principal(decode_value(msg({"principal": None}))) == ""  # type: ignore[arg-type]
    assert message_principal(decode_value(msg("not base64!"))) == ""  # type: ignore[arg-type]
    assert message_principal(decode_value(msg({"principal": "x"}, prefix="other"))) is None  # type: ignore[arg-type]
    assert decode_value(msg({"principal": "x"})).tx_id == 5  # type: ignore[union-attr]


def test_the_memo_is_dropped_with_the_policy(checker: WriteChecker) -> None:
    assert checker.decide("c", "Staff:t1", "public.customers", 1_800_000_000_000).allowed
    assert not checker.decide("d", "Staff:t1", "public.customers", 1_800_000_000_000).allowed
    generation = checker.engine.generation
    checker.engine.add_entities(staff_entities([("t9", "0101", "bank-a", True, ["manager"])]))
    assert checker.engine.generation == generation + 1
    checker.refresh()
    assert checker.decide("d", "Staff:t9", "public.customers", 1_800_000_000_000).allowed


def message(principal: str, tx_id: int = 77) -> bytes:
    """A PostgreSQL attribution message of transaction `tx_id`."""
    content = base64.b64encode(json.dumps({"principal": principal}).encode()).decode()
    return orjson.dumps({"op": "m", "ts_ms": 1, "message": {"prefix": "guard.principal", "content": content},
                         "source": {"connector": "postgresql", "db": "b", "txId": tx_id, "lsn": 1}})


def test_a_batch_records_its_messages_and_looks_up_its_deletes_in_one_round_trip(checker: WriteChecker) -> None:
    """`prepare`: the batch's messages are recorded and its deletes' transactions looked up together, the
    records first, so a delete read before its message in the same batch does not wait for it."""
    store: Attributions = checker.store  # type: ignore[assignment]
    delete, note = decode_value(event("d")), decode_value(message("Staff:m1"))
    assert delete is not None and note is not None
    checker.prepare([note], [(("t", 0, 9), delete)])
    assert store.exchanges == 1 and store.sets == {77: {"Staff:m1"}}
    decided = checker.decide_event(delete, ("t", 0, 9))
    assert decided is not None and decided.decision == "allow" and decided.principal == "Staff:m1"
    # the message, processed after the delete, is not recorded a second time
    assert checker.record_message(note) == "Staff:m1" and store.singles == 0
    # the answer is that record's, in that batch: the same delete at another place is looked up on its own
    assert checker.decide_event(delete, ("t", 0, 10)).decision == "allow"  # type: ignore[union-attr]
    assert store.singles == 1
    # a new batch forgets what the last one recorded: its message is recorded again (idempotent)
    checker.prepare([], [])
    checker.record_message(note)
    assert store.singles == 2 and store.exchanges == 1  # an empty batch costs no round trip


def test_a_prepared_delete_without_its_message_waits_and_the_next_batch_finds_it(checker: WriteChecker) -> None:
    store: Attributions = checker.store  # type: ignore[assignment]
    delete = decode_value(event("d"))
    assert delete is not None
    checker.prepare([], [(("t", 0, 9), delete)])
    with pytest.raises(AttributionPending):
        checker.decide_event(delete, ("t", 0, 9))
    store.record_attribution("0101", 77, "Staff:t1")  # another worker reads the message meanwhile
    checker.prepare([], [(("t", 0, 9), delete)])  # the held delete is fetched again
    decided = checker.decide_event(delete, ("t", 0, 9))
    assert decided is not None and decided.principal == "Staff:t1" and store.exchanges == 2
    # two principals named in the batch's messages: the delete is nobody's
    checker.prepare([decode_value(message("Staff:m1"))], [(("t", 0, 9), delete)])  # type: ignore[list-item]
    assert checker.decide_event(delete, ("t", 0, 9)).decision == "unattributed"  # type: ignore[union-attr]
