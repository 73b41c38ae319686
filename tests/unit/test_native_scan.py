"""The native policy pre-scan (`guard_native.scan_write`, `scan_writes`) against its Python reference.

`guard.pipeline.policy.scan_write` reads a raw Debezium value with a few byte searches; the native path
reads a whole run with the same searches in Rust (`native/src/scan.rs`) and asks `WriteChecker.decide` once
per distinct write. Both must give the same answer on every input, the ones they can't read included:
ordinary events of every op, principals with escapes, non-strings, non-UTF-8 bytes, keys repeated or
missing, truncated documents, and random mutations of all of these.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.config import load_settings
from guard.pipeline.policy import NOT_A_WRITE, WriteChecker, WriteDecision, principal_text, scan_write
from guard.pipeline.sanitizer import Sanitizer
from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities
from guard.protect import fastpath
from guard.records.codec import write_reason

pytestmark = pytest.mark.skipif(os.environ.get("NATIVE") == "0",
                                reason="NATIVE=0: built without the compiled hot path")

STAFF = staff_entities([("t1", "0101", "bank-a", True, ["teller"]), ("m1", "0101", "bank-a", True, ["manager"])])
PREFIX = "br0101"


@pytest.fixture(scope="module")
def native() -> Any:
    assert fastpath.native_available(), "guard_native is not installed: run `make venv` (needs cargo), or NATIVE=0"
    import guard_native
    return guard_native


@pytest.fixture
def checker() -> WriteChecker:
    settings = load_settings(None, branch="0101", policy_staff="file", raw_topic_prefix=PREFIX)
    return WriteChecker(settings, PolicyEngine(default_directory(), entity_source=lambda: STAFF), None)


def event(op: str, principal: object = "Staff:t1", ts: object = 1_800_000_000_000, **extra: object) -> bytes:
    row = {"customer_id": 1, "name": "x", "updated_by": principal, **extra}
    doc = {"before": row if op in ("u", "d") else None, "after": None if op == "d" else row,
           "source": {"connector": "postgresql", "db": "b", "schema": "public", "table": "customers",
                      "ts_ms": ts, "txId": 77, "lsn": 5}, "op": op, "ts_ms": 1_800_000_000_500}
    return orjson.dumps(doc)


TRICKY: list[bytes] = [
    b"", b"{}", b'"op":"', b'{"op":"c"}', b'{"op":"r"}', b'{"op":"d"}', b'{"op":"t"}', b'{"op":"m"}',
    b'{"op":"cx"}', b'{"op":"', b'{"op":"c","after":{"updated_by":"',
    b'{"after":{"updated_by":"Staff:t1"},"op":"c"}',
    b'{"after":{"updated_by":null},"op":"u"}', b'{"after":{"updated_by":nul},"op":"u"}',
    b'{"after":{"updated_by":nullx},"op":"u"}', b'{"after":{"updated_by":""},"op":"c"}',
    b'{"after":{"updated_by":5},"op":"c"}', b'{"after":{"updated_by":"a\\"b"},"op":"c"}',
    b'{"after":{"updated_by":"a\\\\"},"op":"c"}', b'{"after":{"updated_by":"\xff\xfe\xc3"},"op":"c"}',
    b'{"after":{"updated_by":"\xe6\xad\xa6\xe6"},"op":"c"}',
    b'{"updated_by":"Staff:t1","after":{"x":1},"op":"c"}',  # before the after image: unattributed
    b'{"after":null,"updated_by":"Staff:t1","op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":-5},"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":0},"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":99999999999999999999},"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":1.8e12},"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":"1800000000000"},"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"a":1},"ts_ms":1800000000999,"op":"c"}',
    b'{"after":{"updated_by":"Staff:t1"},"source":{"ts_ms":18',
    b'{"after":{"updated_by":"Staff:t1"},"ts_ms":1800000000000,"source":{},"op":"c"}',
    b'{"op":"c","after":{"updated_by":"Staff:t1"},"op":"r"}', b'{"op":"r","after":{},"op":"c"}',
    event("c"), event("u"), event("r"), event("d"), event("c", None), event("u", "Staff:m1"),
    event("c", "Staff:nobody"), event("c", "Root:x"), event("c", 'Staff:"t1"'), event("c", 5),
    event("c", "Staff:t1", None), event("c", "Staff:t1", 7), event("u", "Staff:t1", note='"op":"d"'),
    event("c", "Staff:t1", note="\u6b66\u8001\u5e08"), event("c", "Staff:\u6b66"),
]

SNIPPETS = [b'"op":"', b'"op":"c"', b'"op":"r"', b'"op":"d"', b'"updated_by":', b'"updated_by":"', b'"after":{',
            b'"source":{', b'"ts_ms":', b'"ts_ms":1800000000123', b"null", b'"', b"\\", b"\xff", b"\xe6\xad",
            b"0123456789", b"{", b"}", b",", b"Staff:t1"]


def python_answer(value: bytes) -> tuple[str, str | None, int | None] | None:
    found = scan_write(value)
    return None if found is None else (found[0], principal_text(found[1]), found[2])


def native_answer(native: Any, value: bytes) -> tuple[str, str | None, int | None] | None:
    found = native.scan_write(value)
    return None if found is None else (found[0], principal_text(found[1]), found[2])


def test_the_tricky_values_read_the_same(native: Any) -> None:
    for value in TRICKY:
        assert native.scan_write(value) == scan_write(value), value
        assert native_answer(native, value) == python_answer(value), value


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    value = bytearray(draw(st.sampled_from(TRICKY)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(value)))
        kind = draw(st.sampled_from(["insert", "delete", "truncate", "byte"]))
        if kind == "insert":
            value[at:at] = draw(st.sampled_from(SNIPPETS))
        elif kind == "delete":
            del value[at:at + draw(st.integers(1, 12))]
        elif kind == "truncate":
            del value[at:]
        else:
            value[at:at] = bytes([draw(st.integers(0, 255))])
    return bytes(value)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=mutated())
def test_mutated_values_read_the_same(native: Any, value: bytes) -> None:
    assert native.scan_write(value) == scan_write(value)


@settings(max_examples=500, deadline=None)
@given(value=st.binary(max_size=200))
def test_arbitrary_bytes_read_the_same(native: Any, value: bytes) -> None:
    assert native.scan_write(value) == scan_write(value)


def reference_run(checker: WriteChecker, records: list[tuple[Any, ...]], start: int,
                  stop: int) -> tuple[int, list[tuple[str, WriteDecision]]]:
    """The pre-scan as `Sanitizer.run_native` did it per record before it was native."""
    decided = []
    for j in range(start, stop):
        _, topic, _, _, value = records[j]
        found = None if value is None or topic == checker.message_topic else \
            checker.scan(value, topic[len(PREFIX) + 1:])
        if found is None or (found[1] is not NOT_A_WRITE and not found[1].allowed):
            return j, decided
        decided.append(found)
    return stop, decided


def record(value: bytes | None, table: str = "public.customers") -> tuple[Any, ...]:
    return (None, f"{PREFIX}.{table}", 0, 0, value)


RUNS = [
    [event("c"), event("u"), event("r"), event("u", "Staff:m1"), event("c", None)],  # stops at the unattributed
    [event("c"), event("c"), event("c", "Staff:t1", 1_800_000_001_000), event("r"), event("u")],
    [event("r"), event("r"), event("d"), event("c")],
    [event("c"), event("c", "Staff:nobody"), event("c")],
    [event("c"), event("c", "Staff:t1", None), event("c", 'Staff:"t1"')],
    [event("c"), None, event("c")],
    [event("u", "Staff:m1"), event("u", "Staff:m1"), event("u", "Staff:m1", note="x"), event("c", "Staff:\u6b66")],
]


@pytest.mark.parametrize("run", RUNS)
def test_a_run_is_scanned_as_record_by_record(native: Any, checker: WriteChecker, run: list[bytes | None]) -> None:
    records = [record(value) for value in run]
    records.insert(2, record(event("c"), "public.accounts"))
    for start in range(len(records)):
        for stop in range(start, len(records) + 1):
            want_end, decided = reference_run(checker, records, start, stop)
            calls: list[tuple[Any, ...]] = []
            decide = Sanitizer._scan_decider(SimpleNamespace(_prefix_len=len(PREFIX) + 1), checker)  # type: ignore[arg-type]

            def counted(*args: Any, decide: Any = decide, calls: list[tuple[Any, ...]] = calls) -> bytes | None:
                calls.append(args)
                return decide(*args)  # type: ignore[no-any-return]

            end, reasons = fastpath.scan_writes(records, start, stop, checker.message_topic, counted)
            assert end == want_end
            assert len(reasons) == end - start
            for (op, write), reason in zip(decided, reasons, strict=True):
                if write is NOT_A_WRITE:
                    assert op == "r" and reason is None
                else:
                    assert write.allowed and reason == write_reason(write.as_dict()).encode()
            assert len(calls) == len(set(calls)), "decide once per distinct write"


def test_a_runs_reasons_are_the_decisions_texts(checker: WriteChecker) -> None:
    records = [record(event("c")), record(event("r")), record(event("u", "Staff:m1")), record(event("c"))]
    decide = Sanitizer._scan_decider(SimpleNamespace(_prefix_len=len(PREFIX) + 1), checker)  # type: ignore[arg-type]
    end, reasons = fastpath.scan_writes(records, 0, len(records), checker.message_topic, decide)
    assert end == 4
    want = [None if w is NOT_A_WRITE else write_reason(w.as_dict()).encode()
            for _, w in (checker.scan(r[4], "public.customers") for r in records)]  # type: ignore[misc]
    assert reasons == want
    assert reasons[0] is reasons[3], "one text per distinct decision"


def test_attribution_messages_and_tombstones_stop_the_run(checker: WriteChecker) -> None:
    decide = Sanitizer._scan_decider(SimpleNamespace(_prefix_len=len(PREFIX) + 1), checker)  # type: ignore[arg-type]
    records = [record(event("c")), (None, checker.message_topic, 0, 1, event("c")), record(event("c"))]
    assert fastpath.scan_writes(records, 0, 3, checker.message_topic, decide)[0] == 1
    records = [record(event("c")), record(None)]
    assert fastpath.scan_writes(records, 0, 2, checker.message_topic, decide)[0] == 1
    assert fastpath.scan_writes(records, 0, 1, checker.message_topic, decide)[0] == 1
