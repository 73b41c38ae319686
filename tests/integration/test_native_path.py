"""The compiled hot path (`guard_native`) against the Python path: identical bytes, or a clean decline.

Two sanitizers share one key manager (real Redis) and a fixed clock. Both paths seal with random nonces
(OpenSSL's, through `guard_native.SealingKey`: no way to choose one exists there), so each sealed image is
opened (associated data rebuilt from the record, as a reader does) and replaced by bytes derived from its
header, plaintext and associated data before comparing (`canonical_sealing`): a sealed image is then the
same bytes whichever path sealed it, and one that doesn't open fails. Every generated
event goes through both sanitizers twice (the first time registers the table plan with the native path,
the second takes it when the event is ordinary); each pair of outcomes must be identical, and ordinary
events must actually have taken the native path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import uuid

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.config import load_settings
from guard.kafka.runner import SanitizerWorker
from guard.keys import primitives
from guard.pipeline import sanitizer as sanitizer_module
from guard.pipeline.plan import Planner, is_subject_id
from guard.pipeline.runtime import build_catalog, build_keys
from guard.pipeline.sanitizer import Sanitizer
from guard.protect import fastpath
from guard.protect.aad import image_aad
from guard.protect.fastpath import native_available
from guard.protect.reveal import image_subject, open_image
from guard.records.codec import decode, write_decision_of
from guard.telemetry import Telemetry
from guard.workload import synth
from tests.integration.kafka_helpers import read_all

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("NATIVE") == "0", reason="NATIVE=0: built without the compiled hot path"),
]

PREFIX = "br0101"
TRACE = "0af7651916cd43dd8448eb211c80319c"


class CountingFastPath:
    """Delegates to the real FastPath and counts the events it served (did not decline)."""

    def __init__(self, inner):
        self.inner, self.served = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def process(self, *args):
        result = self.inner.process(*args)
        self.served += result is not None
        return result


@pytest.fixture(scope="module")
def pair(stack):
    assert native_available(), "guard_native is not installed: run `make venv` (needs cargo), or NATIVE=0"
    branch = f"n{uuid.uuid4().hex[:8]}"
    common = dict(kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"], redis_url=stack["GUARD_REDIS_URL"], branch=branch,
                  worker_id="test-native", raw_topic_prefix=PREFIX)
    py_settings = load_settings(None, hot_path="python", **common)
    native_settings = load_settings(None, hot_path="native", **common)
    keys = build_keys(py_settings, listen=False)
    catalog = build_catalog(py_settings)
    python = Sanitizer(py_settings, keys, catalog, clock=lambda: 1_800_000_000.25)
    native = Sanitizer(native_settings, keys, catalog, clock=lambda: 1_800_000_000.25)
    assert python.hot_path == "python" and native.hot_path == "native"
    for san in (python, native):
        san.act_on_deletes = False  # an erasure would destroy keys the other sanitizer still uses
    native._fast = CountingFastPath(native._fast)
    _PAIR_KEYS[:] = [keys]
    return python, native


#: The pair's key manager, for `canonical_sealing`.
_PAIR_KEYS: list = []


def canonical_sealing(topic: str, key: bytes | None, value):
    """A sanitized record's value with each sealed image opened and replaced by its canonical form: the
    header (format, key version) and a SHAKE-256 digest of the opened plaintext and the associated data,
    as long as the nonce, ciphertext and tag (see the module documentation); other values unchanged.

    Opening uses the key version named in the ciphertext and the associated data rebuilt from the record
    (`guard.protect.reveal`'s rule), so a native image sealed under another key, version or associated
    data raises `IntegrityError` here. Only the nonce, ciphertext and tag are replaced (same length)."""
    if not isinstance(value, bytes) or not topic.startswith("sanitized."):
        return value
    keys = _PAIR_KEYS[0]
    record = decode(value)
    for image in ("before", "after"):
        img = record.get(image)
        ct = img["sealed"]["ct"] if img and img.get("sealed") else None
        if not ct:
            continue
        subject = image_subject(record, image)
        _, version = primitives.sealed_header(ct)
        aead = keys.subject_aead_for(record["branch"], subject, ct)
        aad = image_aad(topic, record["table"], key or b"", image, subject, str(record["op"]),
                        str(record["position"]), list(img["sealed"]["fields"]), version)
        opened = aead.open(ct, aad)
        resealed = ct[:5] + hashlib.shake_256(len(aad).to_bytes(4, "big") + aad + opened).digest(len(ct) - 5)
        assert len(resealed) == len(ct) and value.count(ct) == 1
        value = value.replace(ct, resealed)
    return value


def canonical_dlq(value):
    """A DLQ record's value with its quarantined copies (sealed under the tenant's quarantine key, random
    nonces) opened and replaced by a digest of what they hold and their associated data; fails if one
    doesn't open."""
    import base64

    body = orjson.loads(value)
    quarantine = body.get("quarantine") or {}
    for part in ("key", "value"):
        if quarantine.get(part):
            aad = quarantine["aad"].encode() + b"|" + part.encode()
            opened = _PAIR_KEYS[0].quarantine.open(base64.b64decode(quarantine[part]), aad)
            quarantine[part] = hashlib.sha256(aad + b"\0" + opened).hexdigest()
    return orjson.dumps(body)


def comparable(outcome):
    """The outcome as comparable data: exact bytes for sanitized/audit/DLQ (sealed images canonical), anomalies
    without their uuid."""
    records = []
    for rec in outcome.records:
        value = canonical_sealing(rec.topic, rec.key, rec.value)
        if rec.topic == "guard.dlq" and value is not None:
            value = canonical_dlq(value)
        if rec.topic == "guard.anomalies" and value is not None:
            value = {k: v for k, v in orjson.loads(value).items() if k != "id"}
        records.append((rec.topic, rec.key, value, rec.partition, rec.headers))
    return outcome.decision, outcome.table, dict(outcome.classes), outcome.dlq_reason, records


def run_both(pair, table: str, key: bytes, value: bytes, *, prefetch: bool, trace_id: str | None):
    python, native = pair
    topic = f"{PREFIX}.{table}"
    served_before = native._fast.served
    for _ in range(2):  # twice: the second time, the native sanitizer knows the plan (and alerts were sent)
        for san in pair:
            if prefetch:
                san.prefetch([(topic, 0, 7, value)])
        expected = python.process(topic, 0, 7, key, value, trace_id)
        assert comparable(native.process(topic, 0, 7, key, value, trace_id)) == comparable(expected)
    return expected, native._fast.served - served_before


# --- generated rows ---------------------------------------------------------------------------------
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), texts,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**63, max_value=2**64 - 1),  # beyond a long: carried as text
    st.floats(allow_nan=False, allow_infinity=False),
)
nested = st.one_of(st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.sampled_from("abc"), texts, max_size=2))


def base_row(table: str, seed: int) -> dict:
    rng = random.Random(seed)
    if table == "public.customers":
        row = synth.new_customer(rng, seed)
    elif table == "public.accounts":
        row = synth.new_account(rng, seed)
    elif table == "public.transactions":
        row = synth.new_transaction(rng, synth.new_account(rng, seed))
    else:
        row = {"customer_id": seed, "login_name": f"user{seed}", "password_hash": "x" * 20, "query_pin": "123456",
               "updated_at": 1_700_000_000_000}
    return {k: v if v is None or isinstance(v, (str, int, float)) else
            v.isoformat() if hasattr(v, "isoformat") else str(v) for k, v in row.items()}


@st.composite
def ordinary_events(draw):
    """Well-formed Debezium events of catalogued tables, with values of every JSON type in their columns."""
    table = draw(st.sampled_from(["public.customers", "public.accounts", "public.transactions",
                                  "public.customer_auth"]))
    row = base_row(table, draw(st.integers(1, 10_000)))
    for column in list(row):
        if draw(st.integers(0, 3)) == 0:
            row[column] = draw(st.one_of(scalars, nested) if draw(st.booleans()) else scalars)
    op = draw(st.sampled_from(["c", "r", "u", "d"]))
    other = dict(row)
    if row and draw(st.booleans()):
        column = draw(st.sampled_from(sorted(row)))
        other[column] = draw(scalars)
    before, after = {"c": (None, row), "r": (None, row), "u": (other, row), "d": (row, None)}[op]
    source = {"version": "3.6.1.Final", "connector": "postgresql", "name": PREFIX, "db": "branch_0101",
              "schema": "public", "table": table.split(".")[1], "ts_ms": draw(st.integers(0, 2**41)),
              "lsn": draw(st.integers(0, 2**40)), "xmin": None}
    event = {"before": before, "after": after, "source": source, "op": op, "ts_ms": draw(st.integers(0, 2**41)),
             "transaction": None}
    key = json.dumps({"customer_id": row.get("customer_id")}).encode()
    return table, key, event


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ordinary_events(), st.booleans(), st.booleans(), st.booleans())
def test_ordinary_events_take_the_native_path_with_identical_output(pair, generated, prefetch, traced, escaped):
    table, key, event = generated
    value = json.dumps(event, ensure_ascii=escaped).encode()  # non-ASCII text as \u escapes or as UTF-8
    expected, served = run_both(pair, table, key, value, prefetch=prefetch, trace_id=TRACE if traced else None)
    root_delete = event["op"] == "d" and table == "public.customers"
    # Rows whose images name no usable subject id, or two different ones (a row moved between customers),
    # take the Python path: it seals each image under its own subject (per-row keys for rows without one).
    ids = [image.get("customer_id") for image in (event["before"], event["after"]) if image is not None]
    one_person = all(is_subject_id(i) for i in ids) and len({str(i) for i in ids}) == 1
    if expected.decision == "protected" and not root_delete and one_person:
        assert served >= 1, "an ordinary event did not take the native path"
    else:
        assert served == 0, f"the native path served a {expected.decision} event"


def per_record_subjects(native, records) -> set[str]:
    """The subjects a batch's keys were loaded for before `FastPath.batch_subjects`: `subject_value` per
    record, the Python decoding of the records it couldn't read."""
    subjects = set()
    for record in records:
        value = record[3]
        try:
            hit = native._fast.subject_value(value) if value is not None else None
            if hit is not None:
                if is_subject_id(hit[1]):
                    subjects.add(native.planner.subject_for(hit[1], native._fast_plans[hit[0]].schema_table))
                continue
        except Exception:  # noqa: BLE001, S112 - as the sanitizer did: `process` meets it again
            continue
        subjects |= native._decode_subjects([record])
    native.decoder.clear()
    return subjects


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ordinary_events(), min_size=1, max_size=10), st.integers(0, 12), st.booleans())
def test_a_batchs_keys_load_in_one_call_for_the_subjects_read_record_by_record(pair, events, start, repeat):
    """`_load_keys_from` reads the batch's subjects natively in one call (`FastPath.batch_subjects`): the
    same subjects as reading each record (`subject_value`, else decoding it), from the record that missed
    its key on, with tombstones, undecodable values and envelopes it doesn't read among them."""
    python, native = pair
    for table in ("public.customers", "public.accounts", "public.transactions", "public.customer_auth"):
        row = base_row(table, 5)
        source = {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": table.split(".")[1],
                  "ts_ms": 5, "lsn": 99}
        run_both(pair, table, b'{"customer_id": 5}', orjson.dumps({"before": None, "after": row, "source": source,
                                                                   "op": "c", "ts_ms": 6}),
                 prefetch=False, trace_id=None)  # the plans are registered with the native path
    batch = [(f"{PREFIX}.{table}", n % 2, 10 + n, orjson.dumps(event)) for n, (table, _, event) in enumerate(events)]
    if repeat:
        batch += [(t, p, o + 100, v) for t, p, o, v in batch[:3]]  # the same subjects again: loaded once
    batch[len(batch) // 2:len(batch) // 2] = [(f"{PREFIX}.public.customers", 0, 1, None),
                                               (f"{PREFIX}.public.customers", 0, 2, b"{not json"),
                                               (f"{PREFIX}.public.customers", 0, 3,
                                                orjson.dumps(ODD_ENVELOPES["schema wrapper"]))]
    start = min(start, len(batch) - 1)
    topic, partition, offset, value = batch[start]
    want = per_record_subjects(native, batch[start:])
    loaded: list[set[str]] = []
    with pytest.MonkeyPatch.context() as patch:
        # a batch's subjects go in chunks (`send_prefetch`; these batches fit in the first; none without
        # subjects), a record alone in one `prefetch`
        patch.setattr(native.keys, "send_prefetch", lambda branch, subjects: loaded.append(set(subjects)))
        patch.setattr(native.keys, "prefetch", lambda branch, subjects: loaded.append(subjects))
        native._batch = batch
        native._load_keys_from(topic, partition, offset, value)
        assert native._batch == (), "a batch's keys load once"
        assert len(loaded) <= 1 and set().union(*loaded) == want
        loaded.clear()
        native._batch = batch
        native._load_keys_from(topic, partition, 999, value)  # not in the batch: that record alone
    native.decoder.clear()
    assert loaded == [per_record_subjects(native, [(topic, partition, 999, value)])]


def test_the_mariadb_branchs_events_take_the_native_path_with_identical_output(stack, pair):
    """Real events of the MariaDB branch (source `db`/`file`/`pos`/`gtid`, no `schema`/`lsn`; base64 binary,
    DATETIME as epoch microseconds, TIMESTAMP as ISO strings, decimals as strings): same bytes on both paths,
    and the compiled path serves them."""
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    for table in ("customers", "accounts", "transactions", "customer_auth"):
        records = [r for r in read_all(bootstrap, f"br0202.branch_0202.{table}", timeout=30)
                   if r.value and orjson.loads(r.value)["op"] in ("r", "c", "u")][:15]
        assert records, table
        for rec in records:
            expected, served = run_both(pair, f"branch_0202.{table}", rec.key, rec.value, prefetch=False,
                                        trace_id=None)
            assert expected.decision == "protected" and expected.table == f"branch_0202.{table}"
            assert served >= 1, f"a MariaDB {table} event did not take the native path"


# --- envelopes the native path must decline (or handle identically) ------------------------------------
def _customer_event(**changes) -> dict:
    row = base_row("public.customers", 42)
    source = {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": "customers",
              "ts_ms": 5, "lsn": 99}
    event = {"before": None, "after": row, "source": source, "op": "c", "ts_ms": 6}
    for path, value in changes.items():
        target = event
        *parents, last = path.split("__")
        for p in parents:
            target = target[p]
        if value is _DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return event


_DELETE = object()

ODD_ENVELOPES = {
    "schema wrapper": {"schema": {"type": "struct", "fields": []}, "payload": _customer_event()},
    "truncate": _customer_event(op="t", after=None),
    "logical message": _customer_event(op="m", after=None, message={"prefix": "p", "content": "c"}),
    "unknown op": _customer_event(op="x"),
    "op not a string": _customer_event(op=1),
    "no source": _customer_event(source=_DELETE),
    "source a list": _customer_event(source=[1]),
    "table missing": _customer_event(source__table=_DELETE),
    "table empty": _customer_event(source__table=""),
    "after a list": _customer_event(after=[1, 2]),
    "create without after": _customer_event(after=None),
    "namespace from db": _customer_event(source__schema=None),
    "namespace not a string": _customer_event(source__schema=5),
    "db not a string": _customer_event(source__db=5),
    "ts_ms a string": _customer_event(ts_ms="6"),
    "ts_ms a bool": _customer_event(ts_ms=True),
    "ts_ms beyond a long": _customer_event(ts_ms=2**63),
    "ts_ms beyond 64 bits": _customer_event(ts_ms=2**64),
    "source ts_ms a float": _customer_event(source__ts_ms=1.5),
    "lsn null, binlog position": _customer_event(source__lsn=None, source__file="mysql-bin.000003", source__pos=154),
    "lsn a string": _customer_event(source__lsn="0/16B3748"),
    "lsn a float": _customer_event(source__lsn=1.5),
    "binlog file null": _customer_event(source__lsn=None, source__file=None, source__pos=1),
    "no position": _customer_event(source__lsn=_DELETE),
    "unknown column (drift)": _customer_event(after__nickname="小明"),
    "column missing": _customer_event(after__email=_DELETE),
    "subject null": _customer_event(after__customer_id=None),
    "json null document": None,
}


@pytest.mark.parametrize("name", sorted(ODD_ENVELOPES))
def test_odd_envelopes_give_the_same_outcome_on_both_paths(pair, name):
    doc = ODD_ENVELOPES[name]
    value = json.dumps(doc).encode()  # not orjson: it can't write integers beyond 64 bits
    run_both(pair, "public.customers", b'{"customer_id": 42}', value, prefetch=False, trace_id=None)
    run_both(pair, "public.customers", b'{"customer_id": 42}', value, prefetch=True, trace_id=TRACE)


def _raw_event(columns: dict[str, str] | None = None, **replace: str) -> bytes:
    """An ordinary event's JSON text with columns' values given as JSON text and pieces of text replaced
    (for what json.dumps can't write)."""
    columns = columns or {}
    text = json.dumps(_customer_event(**{f"after__{c}": f"@{c}@" for c in columns}), ensure_ascii=False)
    for column, raw in columns.items():
        text = text.replace(f'"@{column}@"', raw)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text.encode()


RAW_ENVELOPES = {
    # orjson rejects these documents, though the odd part is in a member the native path never uses.
    "lone surrogate in an unused member":
        _raw_event(**{'"ts_ms": 6}': '"ts_ms": 6, "transaction": {"id": "\\ud800"}}'}),
    "infinite number in an unused source member": _raw_event(**{'"lsn": 99': '"lsn": 99, "xmin": 1e400'}),
    "infinite number in a column": _raw_event({"name": "1e400"}),
    # Python keeps the last of repeated names (in the first one's place).
    "repeated after image": _raw_event(**{'"op": "c"': '"op": "c", "after": {"customer_id": 1}'}),
    "repeated op": _raw_event(**{'"op": "c"': '"op": "c", "op": "x"'}),
    "repeated column": _raw_event({"name": '"a", "name": "b"'}),
    "repeated source member": _raw_event(**{'"lsn": 99': '"lsn": 99, "lsn": "0/1"'}),
    # Read the same way by both.
    "escaped surrogate pair": _raw_event({"name": '"\\ud83d\\ude00"'}),
    "whitespace everywhere": b" \n" + _raw_event().replace(b", ", b" ,\t") + b" \r\n",
    "float and exponent columns": _raw_event({"name": "1.5e3", "mobile": "-2.5"}),
    "negative zero": _raw_event(**{'"customer_id": 42': '"customer_id": -0'}),
    "integers beyond a long in columns": _raw_event({"name": "18446744073709551615", "mobile": "1" + "0" * 30}),
    "float timestamp": _raw_event(**{'"ts_ms": 6': '"ts_ms": 6.0'}),
    "exponent timestamp": _raw_event(**{'"ts_ms": 6': '"ts_ms": 6e0'}),
}


@pytest.mark.parametrize("name", sorted(RAW_ENVELOPES))
def test_raw_json_oddities_give_the_same_outcome_on_both_paths(pair, name):
    value = RAW_ENVELOPES[name]
    expected, served = run_both(pair, "public.customers", b'{"customer_id": 42}', value, prefetch=False,
                                trace_id=None)
    run_both(pair, "public.customers", b'{"customer_id": 42}', value, prefetch=True, trace_id=TRACE)
    if expected.decision == "protected" and not name.startswith("repeated"):
        assert served >= 1, "an ordinary event did not take the native path"
    elif name != "repeated source member":
        assert served == 0, "the native path took an event the Python path reads differently"


@pytest.mark.parametrize("value", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"text"', b"x" * 10])
def test_undecodable_values_give_the_same_dlq_record(pair, value):
    expected, served = run_both(pair, "public.customers", b'{"customer_id": 1}', value, prefetch=True, trace_id=None)
    assert expected.decision == "dlq" and served == 0


def test_erased_subject_takes_the_python_path_on_both(pair):
    python, native = pair
    row = base_row("public.customers", 777)
    event = {"before": None, "after": row, "op": "c", "ts_ms": 6,
             "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": "customers",
                        "ts_ms": 5, "lsn": 99}}
    value, key = orjson.dumps(event), b'{"customer_id": 777}'
    run_both(pair, "public.customers", key, value, prefetch=False, trace_id=None)
    subject = python._subject_for(777, "public.customers")
    python.erase(subject, trigger="test", reason_code="art47_1_purpose_achieved", reason="test", by="test")
    later = dict(event, source=dict(event["source"], ts_ms=2**41))
    expected, served = run_both(pair, "public.customers", key, orjson.dumps(later), prefetch=False, trace_id=None)
    assert expected.decision == "dlq" and served == 0


def test_records_for_a_compacted_topic_take_the_python_path(pair):
    """Records bound for a compacted sanitized topic go through the Python path, which remembers their keys
    for erasure tombstones (finding 1); both paths still give the same bytes."""
    def compacted(topic: str):
        return {"cleanup.policy": "compact"} if topic.endswith(".public.accounts") else None

    for san in pair:
        san.topic_configs = compacted
        san._compacted.clear()
    try:
        row = base_row("public.accounts", 4711)
        value = json.dumps({"before": None, "after": row, "op": "c", "ts_ms": 6, "source": {
            "connector": "postgresql", "db": "branch_0101", "schema": "public", "table": "accounts", "ts_ms": 5,
            "lsn": 42}}).encode()
        key = json.dumps({"account_id": 4711}).encode()
        expected, served = run_both(pair, "public.accounts", key, value, prefetch=False, trace_id=None)
        assert expected.decision == "protected" and served == 0
        _, native = pair
        run = native.run_native([(None, f"{PREFIX}.public.accounts", 0, 7, value)], 0, produce=None, poll=None,
                                partitions=None, max_record_bytes=10**6)
        assert run.end == 0 and not run.last  # the native run stops before it
    finally:
        for san in pair:
            san.topic_configs = lambda _topic: None
            san._compacted.clear()


def test_memos_are_emptied_with_the_value_caches(pair):
    _, native = pair
    run_both(pair, "public.customers", b'{"customer_id": 5}',
             orjson.dumps(_customer_event()), prefetch=False, trace_id=None)
    assert native._fast.memo_size > 0
    native.expire_value_caches(force=True)
    assert native._fast.memo_size == 0


def test_long_values_are_not_memoised_on_either_path(pair):
    """The memos are bounded by entries, not bytes: customers with distinct 200-KB addresses grew a worker by
    hundreds of MB a minute, each whole value kept as a memo key. Values longer than `MEMO_MAX_CHARS` are
    computed each time, on both paths; the output stays the same."""
    from guard.records.encoders import MEMO_MAX_CHARS

    python, native = pair
    for san in pair:
        san.expire_value_caches(force=True)
    for n in range(3):
        row = {**base_row("public.customers", 20_000 + n), "address": "长" * 5_000 + str(n)}
        run_both(pair, "public.customers", orjson.dumps({"customer_id": 20_000 + n}),
                 orjson.dumps({**_customer_event(), "after": row}), prefetch=False, trace_id=None)
    assert native._fast.memo_size == 3, "only the subjects' tokens (integer ids), not the addresses' masks"
    kept = [v for w in python._writers.values() for memo in (w._mask_memo, w._index_memo) for _, v in memo]
    assert kept and max(len(v) for v in kept) <= MEMO_MAX_CHARS, "a long value was kept as a memo key"


def test_a_customer_seen_again_and_again_keeps_its_memoised_values_while_others_come_and_go(pair, monkeypatch):
    """The compiled path's memos age in two generations (`native/src/memo.rs`): a customer whose events keep
    coming keeps its memoised values while customers seen once fill the memos past their limit again and
    again; the memos stay within the limit, and the output is the Python path's. (Before, every memo was
    dropped whole at its limit, the busy customer's entries with the rest.) Only what comes from Python is
    memoised: the masks and blind-index tokens computed in Rust are not, so the plaintext values they are
    keyed by are not kept past their event (`image::write_image`)."""
    python, native = pair
    limit = 40
    monkeypatch.setattr(sanitizer_module, "new_fast_path",
                        lambda **callbacks: fastpath.new_fast_path(**callbacks, memo_limit=limit))
    small = Sanitizer(native.settings, native.keys, build_catalog(native.settings), clock=lambda: 1_800_000_000.25)
    small.act_on_deletes = False
    topic = f"{PREFIX}.public.customers"

    def event(customer: int) -> tuple[bytes, bytes]:
        row = base_row("public.customers", customer)
        return (orjson.dumps({"customer_id": customer}),
                orjson.dumps({**_customer_event(), "after": row}))

    def process(customer: int, offset: int) -> tuple[int, int]:
        key, value = event(customer)
        small._fast.take_memo_counts()
        outcome = small.process(topic, 0, offset, key, value, None)
        counts = small._fast.take_memo_counts()
        assert comparable(outcome) == comparable(python.process(topic, 0, offset, key, value, None))
        assert small._fast.memo_size <= limit + 2 * entries_per_event, "the memos outgrew their limit"
        return counts

    entries_per_event = 0
    process(7, 1)  # registers the plan: the Python path takes it
    process(7, 2)
    entries_per_event = small._fast.memo_size
    # The subject's token and the address's mask (a kind only the Python function computes); not the name's,
    # mobile's, e-mail's or ID number's masks, nor their blind-index tokens, all computed in Rust.
    assert entries_per_event == 2, "values masked or tokenised in Rust are memoised again"
    hot_misses = 0
    rounds = 60
    for n in range(rounds):
        process(10_000 + n, 10 + 2 * n)  # a customer seen once: all misses, memos fill
        lookups, hits = process(7, 11 + 2 * n)
        assert lookups >= entries_per_event
        hot_misses += lookups - hits
    assert rounds * entries_per_event >= 3 * limit, "the cold customers must fill the memos several times over"
    assert hot_misses == 0, "the busy customer's memoised values were dropped with the others"


def test_a_decoded_value_is_never_used_for_another_record(pair):
    """Same position, different bytes, keys not cached yet (the lazy key load decodes ahead): each output
    must carry its own record's data. Guards against a stale decoded entry standing in for a new value."""
    _, native = pair
    topic = f"{PREFIX}.public.customers"
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is known to the native path from here on
    served = native._fast.served
    for cid in (9_100_001, 9_100_002, 9_100_003):  # new customers: their keys are not in the cache
        name = f"客户{cid}"
        value = orjson.dumps(_customer_event(after__customer_id=cid, after__name=name))
        outcome = native.process(topic, 0, 7, f'{{"customer_id": {cid}}}'.encode(), value)
        record = outcome.records[0]
        opened = open_image(native.keys, decode(record.value), "after", topic=f"sanitized.{topic}",
                            row_key=record.key)
        assert opened["name"] == name
    assert native._fast.served == served + 3


class _Panic(BaseException):
    """Stands in for pyo3's PanicException (a BaseException, so `except Exception` doesn't catch it)."""


def test_a_native_panic_falls_back_to_the_python_path(pair, monkeypatch):
    python, native = pair
    value = orjson.dumps(_customer_event(after__customer_id=43))
    run_both(pair, "public.customers", b'{"customer_id": 43}', value, prefetch=False, trace_id=None)

    def panic(*_):
        raise _Panic("index out of bounds")

    monkeypatch.setattr(native._fast, "process", panic)
    topic = f"{PREFIX}.public.customers"
    expected = python.process(topic, 0, 7, b'{"customer_id": 43}', value)
    got = native.process(topic, 0, 7, b'{"customer_id": 43}', value)
    assert expected.decision == "protected" and comparable(got) == comparable(expected)


# --- the runner's native runs (`Sanitizer.run_native` inside `SanitizerWorker._process_batch`) ---------------
class RecordingProducer:
    """Stands in for the transactional producer: records every `produce` as (topic, value, key, partition,
    timestamp, headers), sealed images and DLQ copies made canonical (`canonical_sealing`, `canonical_dlq`),
    raises BufferError on every `full_every`-th call (once, then accepts the retry), and raises librdkafka's
    MSG_SIZE_TOO_LARGE for a sanitized record over `max_bytes`, as the real client
    does (with the limit set so low, only sanitized records are meant to meet it)."""

    def __init__(self, *, full_every: int = 0, max_bytes: int = 1_000_000):
        self.records: list[tuple] = []
        self.sent_offsets: list[dict[tuple[str, int], int]] = []
        self.calls = 0
        self.polls = 0
        self.full_every, self.max_bytes = full_every, max_bytes

    def produce(self, topic, value=None, key=None, partition=-1, on_delivery=None, callback=None, timestamp=0,
                headers=None):
        self.calls += 1
        if self.full_every and self.calls % self.full_every == 0:
            raise BufferError("Local: Queue full")
        if topic.startswith("sanitized.") and len(value or b"") + len(key or b"") > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        if topic == "guard.anomalies" and value is not None:
            value = {k: v for k, v in orjson.loads(value).items() if k != "id"}
        value = canonical_sealing(topic, key, value)
        if topic == "guard.dlq" and value is not None:
            value = canonical_dlq(value)
        self.records.append((topic, value, key, partition, timestamp, headers))

    def poll(self, timeout=0):
        self.polls += 1
        return 0

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None):
        self.sent_offsets.append({(tp.topic, tp.partition): tp.offset for tp in offsets})


class FixedTopics:
    """`TopicManager.ensure_like` without an admin client: every sanitized topic has 3 partitions."""

    def ensure_like(self, topic: str, source: str) -> int:
        return 3


def batch_worker(stack, sanitizer, producer):
    """A real `SanitizerWorker` around `sanitizer`, its producer and topic admin replaced, a transaction open."""
    settings = sanitizer.settings
    worker = SanitizerWorker(settings, sanitizer, telemetry=Telemetry(settings))
    worker.producer, worker.topics, worker._in_txn = producer, FixedTopics(), True
    return worker


def mixed_batch(seed: int) -> tuple[list[Message], set[int]]:
    """Ordinary events of new customers between records each needing the Python path; also returns the
    offsets of the plain ordinary ones (no headers), which native runs must take."""
    rng = random.Random(seed)
    topic = f"{PREFIX}.public.customers"
    msgs, plain = [], set()
    for n in range(40):
        cid = 7_000_000 + seed * 100 + n
        value = orjson.dumps(_customer_event(after__customer_id=cid, after__name=f"客户{cid}"))
        key, headers, ts = f'{{"customer_id": {cid}}}'.encode(), None, (1, 1_700_000_000_000 + n)
        kind = rng.random()
        if n % 9 == 4:
            value = orjson.dumps(ODD_ENVELOPES[sorted(ODD_ENVELOPES)[n % len(ODD_ENVELOPES)]])
        elif n % 9 == 7:
            value = None  # tombstone
        elif kind < 0.1:
            headers = [("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01".encode())]
        elif kind < 0.15:
            value = b"{not json"
        else:
            plain.add(100 + n)
            if kind < 0.2:
                ts = (0, 0)  # no timestamp
        msgs.append(Message(topic=topic, partition=n % 2, offset=100 + n, key=key, value=value, timestamp=ts,
                            headers=headers))
    return msgs, plain


def process_batch(stack, sanitizer, msgs, **producer_options):
    producer = RecordingProducer(**producer_options)
    sanitizer.subject_activity.clear()  # what earlier tests left (a worker clears it at every commit)
    with pytest.MonkeyPatch.context() as patch:
        # Both paths' audit chains get the same ids, so their audit records must be identical, the chain's
        # `bg-leaf` header (sequence number, link to the previous leaf) included.
        patch.setattr("guard.kafka.audit_chain.new_chain_id", lambda kind, base: f"{kind}/{base}/same")
        worker = batch_worker(stack, sanitizer, producer)
        worker._max_record_bytes = min(worker._max_record_bytes, producer.max_bytes - 64)
        worker._process_batch(msgs)
    assert not producer.sent_offsets, "offsets go to the transaction once, with their tails, at the commit"
    batch = worker.batch
    counts = (batch.events, batch.records_out, batch.by_table_decision, batch.fields, batch.dlq,
              batch.timestamps_ms)
    return producer, dict(worker._last), counts, dict(sanitizer.subject_activity)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_through_native_runs_produces_what_the_python_path_produces(stack, pair, seed):
    python, native = pair
    msgs, plain = mixed_batch(seed)
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is registered with the native path
    by_runs, by_process, loads = [], [], []
    real_run, real_process, real_load = native.run_native, native.process, native.keys.store.send_get_or_create_deks

    def run_native(records, start, **kwargs):
        run = real_run(records, start, **kwargs)
        by_runs.extend(offset for _, _, _, offset, _ in records[start:run.end])
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "run_native", run_native)
        patch.setattr(native, "process", lambda t, p, o, *a: by_process.append(o) or real_process(t, p, o, *a))
        patch.setattr(native.keys.store, "send_get_or_create_deks", lambda *a: loads.append(a) or real_load(*a))
        got = process_batch(stack, native, msgs, full_every=7)
    expected = process_batch(stack, python, msgs, full_every=7)
    assert got[0].records == expected[0].records
    assert got[1:] == expected[1:]
    assert got[0].polls > 0, "a full queue was waited out"
    assert len(loads) == 1, "the batch's new keys are loaded in one round trip"
    assert plain <= set(by_runs), "every plain ordinary record was taken by a native run"
    assert sorted(by_runs + by_process) == [m.offset() for m in msgs], "each record handled exactly once"


def test_a_large_batchs_keys_load_in_chunks_each_requested_before_the_run_needs_it(stack, pair):
    """A batch of new customers loads its keys in chunks of growing size (guard.pipeline.keyload): every
    chunk's request is sent at the first miss, the first chunk's keys are waited for there, each later chunk's
    reply is read where the run reaches that chunk (the key store works on it while the run seals the chunks
    before), and the output is the Python path's, byte for byte."""
    from guard.pipeline.keyload import CHUNK_GROWTH, FIRST_CHUNK_RECORDS

    python, native = pair
    topic, n = f"{PREFIX}.public.customers", FIRST_CHUNK_RECORDS * (1 + CHUNK_GROWTH) + 60
    msgs = []
    for i in range(n):
        cid = 7_900_000 + i
        msgs.append(Message(topic=topic, partition=i % 2, offset=1000 + i, key=f'{{"customer_id": {cid}}}'.encode(),
                            value=orjson.dumps(_customer_event(after__customer_id=cid, after__name=f"客户{cid}")),
                            timestamp=(1, 1_700_000_000_000 + i)))
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is registered with the native path
    log: list[tuple[str, int]] = []
    reached: list[int] = []
    real_send, real_finish, real_load = native.keys.send_prefetch, native.keys.finish_prefetch, native._load_keys_from

    def send(branch, subjects):
        fetch = real_send(branch, subjects)
        log.append(("send", len(subjects)))
        return fetch

    def load(topic, partition, offset, value, index=None):
        reached.append(index)
        return real_load(topic, partition, offset, value, index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native.keys, "send_prefetch", send)
        patch.setattr(native.keys, "finish_prefetch", lambda fetch: log.append(("read", len(fetch.missing)))
                      or real_finish(fetch))
        patch.setattr(native, "_load_keys_from", load)
        patch.setattr(native, "_native_hooks", dataclasses.replace(native._native_hooks, load_keys=load))
        got = process_batch(stack, native, msgs)
    expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records
    assert got[1:] == expected[1:]
    sizes = [FIRST_CHUNK_RECORDS, FIRST_CHUNK_RECORDS * CHUNK_GROWTH, 60]
    assert log == [("send", sizes[0]), ("send", sizes[1]), ("send", sizes[2]),
                   ("read", sizes[0]), ("read", sizes[1]), ("read", sizes[2])], log
    assert reached == [0, sizes[0], sizes[0] + sizes[1]], "each chunk was read where the run first needed it"
    assert all(native.keys.cached_subject_aead(native.branch, native.planner.subject_for(7_900_000 + i,
                                                                                        "public.customers"))
               for i in range(0, n, 97))


def test_a_batchs_activity_is_written_while_it_is_sealed_and_the_commit_writes_the_rest(stack, pair):
    """Native runs stop every `SEND_EVERY_RECORDS` records and send the activity of the records sealed so far
    (guard.pipeline.activity); the commit sends only the pairs not sent, waits for every write, and then the
    key store names the topic for every subject of the batch, early or late. The output is the
    Python path's, byte for byte (the pieces are invisible downstream)."""
    from guard.pipeline.activity import SEND_EVERY_RECORDS

    python, native = pair
    topic, n = f"{PREFIX}.public.customers", SEND_EVERY_RECORDS * 2 + 40
    out_topic = native.planner.sanitized_topic(topic)
    cids = [7_950_000 + i + uuid.uuid4().int % 1000 * 10_000 for i in range(n)]
    msgs = [Message(topic=topic, partition=i % 2, offset=3000 + i, key=f'{{"customer_id": {cid}}}'.encode(),
                    value=orjson.dumps(_customer_event(after__customer_id=cid, after__name=f"客户{cid}")),
                    timestamp=(1, 1_700_000_000_000 + i)) for i, cid in enumerate(cids)]
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is registered with the native path
    store = native.keys.store
    sent: list[int] = []
    real_send = store.send_subject_activity
    native.reset_batch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "send_subject_activity", lambda b, activity: sent.append(len(activity))
                      or real_send(b, activity))
        got = process_batch(stack, native, msgs)
        assert sent == [SEND_EVERY_RECORDS, SEND_EVERY_RECORDS], "the activity went out while the batch was sealed"
        assert len(native.pending_activity()) == 40
        native.send_activity()  # the commit's part (`SanitizerWorker._commit`)
        native.activity_written()
        assert sent[2:] == [40], "the commit writes only what was not sent"
    assert native.pending_activity() == {}, "every pair is recorded"
    subjects = [native.planner.subject_for(cid, "public.customers") for cid in cids]
    for i in (0, SEND_EVERY_RECORDS - 1, SEND_EVERY_RECORDS, n - 1):
        assert out_topic in store.subject_topics(native.branch, subjects[i]), i
    native.reset_batch()
    expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records
    assert got[1:3] == expected[1:3]


def test_native_runs_take_the_envelopes_read_for_the_batchs_keys_and_the_rest_are_dropped(stack, pair):
    """The envelopes `batch_subjects` reads to load a batch's keys are the ones its runs sanitize (each
    record's JSON read once, `native/src/readahead.rs`): a run takes each record's envelope out of the map,
    the ones no run took (records of the Python path) are dropped when the runner is done with the batch,
    and the output is the Python path's, byte for byte."""
    python, native = pair
    topic, traced, plain, msgs = f"{PREFIX}.public.customers", set(), set(), []
    for n in range(30):  # new customers: the first record's key misses, and the rest of the batch is loaded
        cid = 7_700_000 + n
        value = None if n % 10 == 6 else orjson.dumps(_customer_event(after__customer_id=cid,
                                                                       after__name=f"客户{cid}"))
        headers = [("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01".encode())] if n % 10 == 3 else None
        (traced if headers else plain if value else set()).add(200 + n)
        msgs.append(Message(topic=topic, partition=n % 2, offset=200 + n, key=f'{{"customer_id": {cid}}}'.encode(),
                            value=value, timestamp=(1, 1_700_000_000_000 + n), headers=headers))
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is registered with the native path
    events: list[tuple[str, int]] = []

    class Watched:
        """The native path, with what it holds read ahead recorded after each call."""

        def __init__(self, fast):
            self._fast = fast

        def __getattr__(self, name):
            return getattr(self._fast, name)

        def batch_subjects(self, *args):
            out = self._fast.batch_subjects(*args)
            events.append(("loaded", self._fast.read_ahead_size))
            return out

        def run(self, *args, **kwargs):
            out = self._fast.run(*args, **kwargs)
            events.append(("ran", self._fast.read_ahead_size))
            return out

        def forget_read_ahead(self):
            events.append(("forgotten", self._fast.read_ahead_size))
            self._fast.forget_read_ahead()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "_fast", Watched(native._fast))
        got, by_runs = process_batch_natively(stack, native, msgs)
    expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records and got[1:] == expected[1:]
    assert set(by_runs) == plain, "native runs took every record but the traced ones and the tombstones"
    assert [what for what, _ in events if what != "ran"] == ["loaded", "forgotten"], events
    loaded, forgotten = events[0][1], events[-1][1]
    assert loaded == len(plain) + len(traced), "every record the keys' load read is kept for the runs"
    after_runs = [n for what, n in events if what == "ran"]
    assert len(after_runs) >= 4 and after_runs == sorted(after_runs, reverse=True), events
    assert loaded - forgotten == len(plain), "each record a run took was read once, when the keys were loaded"
    assert forgotten == len(traced), "the Python path's records are dropped when the batch is done"
    assert native._fast.read_ahead_size == 0, "nothing of the batch is held after it"


def test_native_sealing_reads_the_key_managers_cache_by_its_rule(pair):
    """Each event's key comes from the key manager's own cache (`KeyManager.native_key_cache`, read in
    Rust): the entry of (branch, subject) while unexpired, else the key-not-loaded signal, never a key
    that expired or was dropped (an erasure's invalidation pops it); the lookups count in the manager's
    counters as `cached_subject_aead`'s do."""
    import time

    from guard.pipeline.sanitizer import _KeyNotLoaded

    python, native = pair
    run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
             trace_id=None)  # the plan is registered with the native path
    keys, fast, topic = native.keys, native._fast.inner, f"{PREFIX}.public.customers"
    cid = 7_800_001
    value = orjson.dumps(_customer_event(after__customer_id=cid))
    subject = native.planner.subject_for(cid, "public.customers")
    args = (value, topic, 0, 9, native.planner.sanitized_topic(topic), b"k", None, 1_800_000_000_000)
    cache = keys.native_key_cache()
    fast.take_key_counts()
    keys.prefetch(native.branch, {subject})
    entry, expiry = cache[(native.branch, subject)]
    assert expiry > time.monotonic()
    aead = primitives.Aead.of_cache_entry(entry)
    before = (keys.key_lookups, keys.key_hits)
    done = fast.process(*args)
    assert done is not None and done[3] == subject
    record = decode(done[0])
    sealed = record["after"]["sealed"]
    aad = image_aad(args[4], record["table"], b"k", "after", subject, record["op"], record["position"],
                    list(sealed["fields"]), primitives.sealed_header(sealed["ct"])[1])
    assert orjson.loads(aead.open(sealed["ct"], aad)), "sealed under the cached key"
    assert fast.take_key_counts() == (1, 1)
    cache[(native.branch, subject)] = (entry, time.monotonic() - 0.001)  # expired
    with pytest.raises(_KeyNotLoaded):
        fast.process(*args)
    del cache[(native.branch, subject)]  # dropped (an invalidation)
    with pytest.raises(_KeyNotLoaded):
        fast.process(*args)
    assert fast.take_key_counts() == (2, 0)
    assert fast.take_key_counts() == (0, 0), "counts are handed over once"
    # Through the sanitizer, the manager counts them: one miss, the batch's keys loaded, one hit.
    assert native.process(topic, 0, 9, b'{"customer_id": 7800001}', value, None).decision == "protected"
    assert (keys.key_lookups - before[0], keys.key_hits - before[1]) == (2, 1)


def test_messages_with_errors_in_a_batch_are_skipped_alike_on_both_paths(stack, pair):
    """The native first pass over a fetched batch (`take_messages`) stops at each message with an error, the
    runner skips it (a partition's end) or logs it, and the pass goes on after it: the same records,
    offsets and rewind points as the Python loop."""
    python, native = pair
    msgs = mixed_batch(6)[0][:14]
    eof = KafkaError(KafkaError._PARTITION_EOF)
    other = KafkaError(KafkaError._TRANSPORT)
    for at, error in ((0, eof), (5, other), (9, eof), (len(msgs), eof)):
        msgs.insert(at, Message(topic=f"{PREFIX}.public.customers", partition=at % 2, offset=-1, error=error))
    got = process_batch(stack, native, msgs)
    expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records and got[1:] == expected[1:]
    assert got[1] == {(m.topic(), m.partition()): max(x.offset() for x in msgs if x.error() is None
                                                       and x.partition() == m.partition())
                      for m in msgs if m.error() is None}


def test_an_output_over_the_size_limit_goes_to_the_dlq_on_both_paths(stack, pair):
    python, native = pair
    msgs = mixed_batch(9)[0][:10]
    got = process_batch(stack, native, msgs, max_bytes=300)
    expected = process_batch(stack, python, msgs, max_bytes=300)
    assert got[0].records == expected[0].records and got[1:] == expected[1:]
    assert "output_too_large" in got[2][4]


def test_a_key_the_sanitizer_cannot_handle_goes_to_the_dlq_and_the_batch_goes_on(stack, pair):
    """A callback error in a native run stops the run before that record; the Python path then applies its
    policy (DLQ, internal_error) and the records after it are still processed, on both paths alike."""
    python, native = pair
    msgs = mixed_batch(11)[0][:12]
    # A key native runs don't sanitize themselves (a float), so both paths ask the sanitizer for it.
    poisoned = b'{"customer_id": 7001105.5}'
    m = msgs[5]
    msgs[5] = Message(topic=m.topic(), partition=m.partition(), offset=m.offset(), key=poisoned, value=m.value(),
                      timestamp=m.timestamp(), headers=m.headers())

    def failing(real):
        def sanitize_key(schema_table, key):
            if key == poisoned:
                raise RuntimeError("boom")
            return real(schema_table, key)
        return sanitize_key

    with pytest.MonkeyPatch.context() as patch:
        for san in pair:
            san.expire_value_caches(force=True)  # no memoised sanitized key for the poisoned one
            patch.setattr(san, "sanitize_key", failing(san.sanitize_key))
        got = process_batch(stack, native, msgs)
        expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records and got[1:] == expected[1:]
    assert got[2][4].get("internal_error") == 1
    assert got[1] == {(m.topic(), m.partition()): max(x.offset() for x in msgs if x.partition() == m.partition())
                      for m in msgs}


def test_offsets_sent_early_count_only_if_they_are_the_commits_own(stack, pair):
    """Batches send no offsets (the commit sends them once, with the chains' tails); `_commit` uses the
    send it started only if it succeeded with exactly the offsets it needs; a failed, stale or missing send
    makes it send them itself."""
    import concurrent.futures

    _, native = pair
    msgs, _ = mixed_batch(4)
    producer = RecordingProducer()
    worker = batch_worker(stack, native, producer)
    worker._process_batch(msgs[:20])
    worker._process_batch(msgs[20:])
    worker._txn_pool.submit(lambda: None).result(timeout=30)  # calls run in order: a send the batches queued is done
    assert producer.sent_offsets == [], "no send per fetched batch: it would be superseded by the commit's"
    worker._early_offsets.send(worker._txn_pool, producer, worker.consumer, worker._last, 10,
                               worker.chains.metadata(worker._last))  # what `_commit` sends
    assert worker._early_offsets.pending is not None
    concurrent.futures.wait([worker._early_offsets.pending[1]])  # it runs on the helper thread
    assert producer.sent_offsets == [{tp: offset + 1 for tp, offset in worker._last.items()}]
    assert worker._early_offsets_cover_batch()
    assert not worker._early_offsets_cover_batch(), "used once"

    failed: concurrent.futures.Future[None] = concurrent.futures.Future()
    failed.set_exception(KafkaException(KafkaError(KafkaError.CONCURRENT_TRANSACTIONS)))
    worker._early_offsets.pending = (dict(worker._last), failed)
    assert not worker._early_offsets_cover_batch()

    done: concurrent.futures.Future[None] = concurrent.futures.Future()
    done.set_result(None)
    stale = {tp: offset - 1 for tp, offset in worker._last.items()}
    worker._early_offsets.pending = (stale, done)
    assert not worker._early_offsets_cover_batch()


def test_write_decisions_are_the_same_on_both_paths(stack, pair):
    """With the access policy on, every write handled by a native run still gets its decision (in its own
    audit record, in the same transaction), and writes not allowed take the Python path: both sanitizers
    produce the same records (decisions, anomalies, `bg-policy` headers), whatever path each event took."""
    from guard.pipeline.policy import WriteChecker
    from guard.policy.engine import PolicyEngine, default_directory
    from guard.policy.sources import staff_entities

    staff = staff_entities([("t0101-01", "0101", "bank-a", True, ["teller"]),
                            ("t0102-01", "0102", "bank-a", True, ["teller"])])
    python, native = pair
    for san in pair:
        engine = PolicyEngine(default_directory(), entity_source=lambda: staff)
        san.checker = WriteChecker(san.settings, engine, None)
        san.checker.policy_branch = "0101"
    try:
        topic = f"{PREFIX}.public.customers"
        principals = ["Staff:t0101-01", "Staff:t0101-01", "Staff:t0102-01", None, "Staff:t0101-01", "nobody:x"]
        msgs = []
        for n in range(36):
            cid = 7_500_000 + n
            event = _customer_event(after__customer_id=cid, after__name=f"客户{cid}", source__ts_ms=1_800_000_000_000)
            who = principals[n % len(principals)]
            if who is not None:
                event["after"]["updated_by"] = who
            if n % 4 == 3:
                event["op"], event["before"] = "u", dict(event["after"], mobile="13800000000")
            msgs.append(Message(topic=topic, partition=n % 2, offset=200 + n, key=f'{{"customer_id": {cid}}}'.encode(),
                                value=orjson.dumps(event), timestamp=(1, 1_700_000_000_000 + n)))
        run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
                 trace_id=None)  # the plan is registered with the native path
        got, by_runs = process_batch_natively(stack, native, msgs)
        expected = process_batch(stack, python, msgs)
        assert len(by_runs) >= 12, "allowed writes were sanitized natively"

        def key(record):
            return repr(record)
        assert sorted(got[0].records, key=key) == sorted(expected[0].records, key=key)
        # One audit record per change (audit format 2): the change's own, carrying its write decision.
        audits = [decode(v) for t, v, *_ in expected[0].records if t == "guard.audit"]
        assert len(audits) == 36 and {a["source_offset"] for a in audits} == {m.offset() for m in msgs}
        assert all(a["v"] == 2 and a["decision"] == "protected" and a["subject"] for a in audits)
        decisions = [write_decision_of(a) for a in audits]
        by_decision: dict[str, int] = {}
        for found in decisions:
            assert found is not None
            by_decision[found[0]] = by_decision.get(found[0], 0) + 1
        assert by_decision == {"write_allowed": 18, "write_denied": 6, "unattributed": 12}
        flagged = [h for t, _, _, _, _, h in expected[0].records if t.startswith("sanitized.") and h]
        assert len(flagged) == 18 and all(dict(h)["bg-policy"] for h in flagged)
    finally:
        for san in pair:
            san.checker = None


def test_records_with_headers_take_native_runs_unless_traced(stack, pair):
    """Every record of a live Debezium connector carries `__debezium.context.*` headers: they take native
    runs (the untraced Python path carries no header but a `traceparent` either), and only a record with a
    `traceparent` stops a run and goes the Python path, which carries it to its outputs. The pre-scan reads
    each record once, not the rest of the batch again at every stop (quadratic: 12-32 s per 2,000-record
    batch in `guard bench --db-latency` before), and the records are those of the Python path."""
    import guard.pipeline.sanitizer as sanitizer_module
    from guard.pipeline.policy import WriteChecker
    from guard.policy.engine import PolicyEngine, default_directory
    from guard.policy.sources import staff_entities

    staff = staff_entities([("t0101-01", "0101", "bank-a", True, ["teller"])])
    python, native = pair
    for san in pair:
        san.checker = WriteChecker(san.settings, PolicyEngine(default_directory(), entity_source=lambda: staff), None)
        san.checker.policy_branch = "0101"
    context = [("__debezium.context.connectorLogicalName", b"br0101"), ("__debezium.context.taskId", b"0")]
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        topic = f"{PREFIX}.public.customers"
        msgs = []
        for n in range(60):
            cid = 7_600_000 + n
            event = _customer_event(after__customer_id=cid, after__name=f"客户{cid}", source__ts_ms=1_800_000_000_000)
            event["after"]["updated_by"] = "Staff:t0101-01"
            headers = [*context, ("traceparent", traceparent)] if n % 20 == 0 else context
            msgs.append(Message(topic=topic, partition=n % 2, offset=300 + n, key=f'{{"customer_id": {cid}}}'.encode(),
                                value=orjson.dumps(event), timestamp=(1, 1_700_000_000_000 + n), headers=headers))
        run_both(pair, "public.customers", b'{"customer_id": 42}', orjson.dumps(_customer_event()), prefetch=False,
                 trace_id=None)  # the plan is registered with the native path
        scanned = [0]
        real_scan_writes = sanitizer_module.scan_writes

        def counting(records, start, stop, *args):
            scanned[0] += stop - start
            return real_scan_writes(records, start, stop, *args)
        runs: list[tuple[int, int, int, int]] = []  # (id of the records list, start, stop, end)

        class Runs:
            """The native path, with its `run` calls recorded."""

            def __init__(self, fast):
                self._fast = fast

            def __getattr__(self, name):
                return getattr(self._fast, name)

            def run(self, records, start, **kwargs):
                out = self._fast.run(records, start, **kwargs)
                runs.append((id(records), start, kwargs["stop"], out[0]))
                return out
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sanitizer_module, "scan_writes", counting)
            patch.setattr(native, "_fast", Runs(native._fast))
            got, by_runs = process_batch_natively(stack, native, msgs)
        expected = process_batch(stack, python, msgs)
        assert sorted(by_runs) == [300 + n for n in range(60) if n % 20], \
            "every record took a native run but the three with a traceparent"
        assert len({batch for batch, _, _, _ in runs}) == 1, "every run is handed the batch itself, never a copy"
        assert all(end <= stop for _, _, stop, end in runs), runs
        assert {stop for _, _, stop, _ in runs} >= {20, 40}, f"runs stop before the traced records: {runs}"
        assert scanned[0] <= len(msgs), f"{scanned[0]} records pre-scanned for {len(msgs)}"
        assert sorted(got[0].records, key=repr) == sorted(expected[0].records, key=repr)
        sanitized = [h for t, _, _, _, _, h in got[0].records if t.startswith("sanitized.")]
        assert len(sanitized) == 60
        assert sorted(map(repr, filter(None, sanitized))) == [repr([("traceparent", traceparent)])] * 3, \
            "a traceparent is carried to the sanitized record, never the connector's context headers"
    finally:
        for san in pair:
            san.checker = None


def process_batch_natively(stack, native, msgs):
    """`process_batch` on the native sanitizer, with the source offsets its native runs took (the rest went
    the Python path)."""
    by_runs: list[int] = []
    real_run = native.run_native

    def run_native(records, start, **kwargs):
        run = real_run(records, start, **kwargs)
        by_runs.extend(offset for _, _, _, offset, _ in records[start:run.end])
        return run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "run_native", run_native)
        return process_batch(stack, native, msgs), by_runs


KAFKA_KEYS = [
    b'{"customer_id": 7200001}', b'{"customer_id":7200002,"login_name":"user7200002"}',
    rb'{"login_name": "\u7528\u62377200003", "customer_id": 7200003}', '{"login_name": "用户7200004"}'.encode(),
    rb'{"login_name": "a\"b"}', rb'{"login_name": "tab\there"}', rb'{"login_name": "a/b\/c"}',
    b'{"customer_id": -7200005}', b'{"customer_id": -0}', b'{"customer_id": 9223372036854775808}',
    b'{"customer_id": 1.5}', b'{"customer_id": 1e3}', b'{"customer_id": true}', b'{"customer_id": null}',
    b'{"customer_id": [1]}', b'{"customer_id": {"a": 1}}', b'{"customer_id": 1, "customer_id": 2}',
    b'{"schema": {}, "payload": {"customer_id": 7200006}}', b'{"payload": 1}', b'{}', b'7200007', b'"text"',
    b'not json', b'{"customer_id": 7200008} trailing', b' {"customer_id" : 7200009 } ', rb'{"\u0063ustomer_id": 1}',
    rb'{"c\"d": 1}', b'\xff\xfe',
]


def test_kafka_keys_sanitized_by_native_runs_are_the_python_paths(stack, pair):
    """Native runs tokenise ordinary Kafka keys themselves (`native/src/token.rs`: objects of integers and
    plain strings) and hand every other key to the sanitizer: whichever did it, the sanitized key is the
    Python path's, byte for byte (clear columns as the catalog allows them, tokens under each column's
    `row_key` key)."""
    python, native = pair
    topic = f"{PREFIX}.public.customer_auth"
    msgs = []
    for n, key in enumerate(KAFKA_KEYS):
        row = {**base_row("public.customer_auth", 7_200_000 + n), "customer_id": 7_200_000 + n}
        event = {"before": None, "after": row, "op": "c", "ts_ms": 6,
                 "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public",
                            "table": "customer_auth", "ts_ms": 5, "lsn": 500 + n}}
        msgs.append(Message(topic=topic, partition=n % 2, offset=500 + n, key=key, value=orjson.dumps(event),
                            timestamp=(1, 1_700_000_000_000 + n)))
    run_both(pair, "public.customer_auth", msgs[0].key(), msgs[0].value(), prefetch=False, trace_id=None)
    for san in pair:
        san.expire_value_caches(force=True)  # no sanitized key memoised by the Python path
    asked: list[bytes] = []
    real = native.sanitize_key
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "sanitize_key", lambda table, key: asked.append(key) or real(table, key))
        got, by_runs = process_batch_natively(stack, native, msgs)
    expected = process_batch(stack, python, msgs)
    assert got[0].records == expected[0].records and got[1:] == expected[1:]
    assert set(by_runs) == {m.offset() for m in msgs}, "native runs took every record"
    ordinary = {KAFKA_KEYS[i] for i in (0, 1, 3, 7, 24)}
    assert not ordinary & set(asked), "native runs sanitized the ordinary keys themselves"
    assert {b'{"customer_id": 1.5}', b"7200007", rb'{"login_name": "a\"b"}'} <= set(asked), \
        "other keys are the sanitizer's"


@pytest.mark.parametrize(("key", "value"), [(b"k", b"v"), (None, b"v"), (b"k", None), (None, None), (b"", b""),
                                            (b"br0101.public.customers:3", bytes(range(256)) * 40)])
def test_the_compiled_leaf_hash_is_the_documented_leaf(key: bytes | None, value: bytes | None) -> None:
    """Native runs hash their audit records where they build them (RustCrypto's SHA-256): byte for byte the
    RFC 6962 leaf hash of docs/audit.md's leaf, as `Chain.stamp` computes it."""
    import guard_native

    from guard.audit import merkle
    from guard.audit.chain import Chain, leaf_bytes

    chain = Chain("audit/br0101.public.customers:3/x")
    chain.stamp(b"first", b"record")
    prefix = chain.head + chain.size.to_bytes(8, "big") + chain.prev
    digest = guard_native.leaf_hash(prefix, key, value)
    assert digest == merkle.leaf_hash(leaf_bytes(prefix, key, value))
    assert chain.stamp(key, value) == prefix and chain.prev == digest


def test_transactions_stay_on_native_runs_with_the_python_paths_facts(stack, pair):
    """Issue 15's amount bands: creates of `transactions` are sanitized by native runs, which hand their
    amounts back for the band; the facts (and every other record) are the Python path's, per topic in the
    same order (a run produces its facts after its changes, in the same transaction)."""
    python, native = pair
    topic = f"{PREFIX}.public.transactions"
    amounts: list[object] = ["12.50", "50000", "49999.99", "-750000.00", 500000, 1e6, None, "abc", "1E+6", [1], "0"]
    msgs = []
    for n, amount in enumerate(amounts * 2):
        row = {"txn_id": 9_300 + n, **base_row("public.transactions", 9_300 + n), "amount": amount}
        op = "c" if n < len(amounts) else "u"
        source = {"version": "3.6.1.Final", "connector": "postgresql", "name": PREFIX, "db": "branch_0101",
                  "schema": "public", "table": "transactions", "lsn": 77_000 + n, "xmin": None,
                  **({"ts_ms": 1_800_000_000_000 + n} if n % 5 else {})}
        event = {"before": dict(row) if op == "u" else None, "after": row, "source": source, "op": op,
                 "ts_ms": 1_800_000_000_500, "transaction": None}
        msgs.append(Message(topic=topic, partition=n % 2, offset=300 + n,
                            key=json.dumps({"txn_id": row.get("txn_id")}).encode(), value=orjson.dumps(event),
                            timestamp=(1, 1_700_000_000_000 + n)))
    run_both(pair, "public.transactions", msgs[0].key(), msgs[0].value(), prefetch=False, trace_id=None)
    got, by_runs = process_batch_natively(stack, native, msgs)
    expected = process_batch(stack, python, msgs)
    assert set(by_runs) == {m.offset() for m in msgs}, "every transaction event was taken by a native run"

    def per_topic(producer) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {}
        for record in producer.records:
            out.setdefault(record[0], []).append(record)
        return out
    assert per_topic(got[0]) == per_topic(expected[0])
    assert got[1:] == expected[1:]
    facts = [orjson.loads(r[1]) for r in expected[0].records if r[0] == python.settings.facts_topic]
    assert sorted(f["attrs"]["amount_band"] for f in facts) == ["large", "very_large", "very_large", "very_large",
                                                                "very_large"]



def test_native_runs_compute_subject_and_search_tokens_without_calling_back(pair, monkeypatch):
    """The native path computes data-subject tokens and blind-index (search) tokens itself, under the same
    keys (`guard_native.TokenKey`): ordinary events call neither `Planner.subject_for` nor
    `KeyManager.search_token`, and their bytes are the Python path's."""
    python, native = pair
    calls: list[str] = []
    real_subject_for, real_search_token = Planner.subject_for, python.keys.search_token

    def subject_for(self, value, table):
        calls.append("subject_for")
        return real_subject_for(self, value, table)

    def search_token(column, value):
        calls.append("search_token")
        return real_search_token(column, value)

    # Bound when a sanitizer is built: a fresh native sanitizer gets the counting ones.
    monkeypatch.setattr(Planner, "subject_for", subject_for)
    monkeypatch.setattr(python.keys, "search_token", search_token)
    fresh = Sanitizer(native.settings, python.keys, build_catalog(native.settings), clock=lambda: 1_800_000_000.25)
    fresh.act_on_deletes = False
    fresh._fast = CountingFastPath(fresh._fast)
    topic = f"{PREFIX}.public.customers"
    run_both((python, fresh), "public.customers", b'{"customer_id": 9001}', orjson.dumps(_customer_event()),
             prefetch=True, trace_id=None)  # registers the plan with the native path
    plan = next(iter(fresh._fast_plans.values()))
    assert plan.index, "the customers table has blind-indexed columns"
    for n, customer in enumerate((9101, -9102, 2**62, "y-9103", "客户 9104", "")):
        event = _customer_event()
        event["after"] = dict(event["after"], customer_id=customer, mobile=f"1380013{n:04d}",
                              id_number=f"11010519491231{n:03d}X")
        value, key = orjson.dumps(event), orjson.dumps({"customer_id": customer})
        expected = python.process(topic, 0, 7, key, value, None)
        calls.clear()
        served = fresh._fast.served
        fresh.prefetch([(topic, 0, 7, value)])
        outcome = fresh.process(topic, 0, 7, key, value, None)
        if customer == "":  # not a person's id: the Python path gives the row its own subject
            assert fresh._fast.served == served
            continue
        assert fresh._fast.served == served + 1, f"customer {customer!r} did not take the native path"
        assert calls == [], f"customer {customer!r}: the native path called back {calls}"
        assert comparable(outcome) == comparable(expected)
