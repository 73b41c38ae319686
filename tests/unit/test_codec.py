"""The specialised Avro writers must produce exactly fastavro's bytes, and decode back."""

from hypothesis import given, settings
from hypothesis import strategies as st

from guard.records.codec import AvroCodec, decode

names = st.text(min_size=1, max_size=12)
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | \
    st.floats(allow_nan=False) | st.text(max_size=30)
sealed = st.none() | st.fixed_dictionaries({"fields": st.lists(names, max_size=6), "ct": st.binary(max_size=300)})
image = st.none() | st.fixed_dictionaries({
    "clear": st.dictionaries(names, scalars, max_size=8),
    "masked": st.dictionaries(names, st.text(max_size=20), max_size=5),
    "index": st.dictionaries(names, st.text(max_size=22), max_size=5),
    "hashed": st.dictionaries(names, st.text(max_size=43), max_size=3),
    "dropped": st.lists(names, max_size=3),
    "erased": st.lists(names, max_size=3),
    "sealed": sealed,
})
opt_long = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
change = st.fixed_dictionaries({
    "v": st.integers(min_value=-(2**31), max_value=2**31 - 1), "op": st.sampled_from(list("cudrtm")),
    "table": names, "branch": names, "db": st.text(max_size=10), "ts_ms": opt_long, "source_ts_ms": opt_long,
    "position": st.text(max_size=20), "subject": st.none() | st.text(max_size=22),
    "before": image, "after": image, "unclassified": st.lists(names, max_size=4),
})
audit = st.fixed_dictionaries({
    "v": st.just(1), "ts_ms": st.integers(min_value=0, max_value=2**62), "worker": names, "branch": names,
    "source_topic": names, "source_partition": st.integers(0, 2**31 - 1), "source_offset": st.integers(0, 2**62),
    "table": st.none() | names, "op": st.none() | names, "subject": st.none() | names, "decision": names,
    "reason": st.none() | st.text(max_size=40), "classes": st.dictionaries(names, st.integers(0, 10**6)),
    "actions": st.dictionaries(names, st.integers(0, 10**6)), "unclassified": st.lists(names, max_size=3),
    "trace_id": st.none() | st.text(max_size=32),
})


@settings(max_examples=300, deadline=None)
@given(change)
def test_sanitized_change_matches_fastavro(record):
    codec = AvroCodec("sanitized_change")
    assert codec.encode(record) == codec.encode_reference(record)
    back = decode(codec.encode(record))
    assert back["table"] == record["table"] and back["after"] == record["after"]


@settings(max_examples=200, deadline=None)
@given(audit)
def test_audit_record_matches_fastavro(record):
    codec = AvroCodec("audit_record")
    assert codec.encode(record) == codec.encode_reference(record)
    assert decode(codec.encode(record)) == record


def test_self_describing_header():
    codec = AvroCodec("audit_record")
    assert codec.header[:2] == b"\xc3\x01" and len(codec.header) == 10


class _StubRegistry:
    """Pure-logic stand-in for a schema registry's two calls (framing test only; see README)."""

    def __init__(self) -> None:
        self.schemas: dict[int, object] = {}

    def register_schema(self, subject: str, schema: object) -> int:
        self.schemas[42] = schema
        return 42

    def get_schema(self, schema_id: int) -> object:
        return self.schemas[schema_id]


def test_confluent_wire_format_with_a_registry():
    registry = _StubRegistry()
    codec = AvroCodec("audit_record", registry=registry, subject="guard.audit-value")
    record = {"v": 1, "ts_ms": 5, "worker": "w", "branch": "0101", "source_topic": "t", "source_partition": 0,
              "source_offset": 9, "table": None, "op": None, "subject": None, "decision": "dlq", "reason": None,
              "classes": {}, "actions": {}, "unclassified": [], "trace_id": None}
    data = codec.encode(record)
    assert data[:5] == b"\x00\x00\x00\x00\x2a"
    assert decode(data, registry=registry) == record


@settings(max_examples=200, deadline=None)
@given(audit)
def test_audit_template_matches_the_full_writer(record):
    from guard.records.encoders import AuditTemplate, encode_audit_record

    template = AuditTemplate(worker=record["worker"], branch=record["branch"], source_topic=record["source_topic"],
                             source_partition=record["source_partition"], table=record["table"], op=record["op"],
                             decision=record["decision"], reason=record["reason"], classes=record["classes"],
                             actions=record["actions"], unclassified=record["unclassified"], version=record["v"])
    encoded = template.encode(record["ts_ms"], record["source_offset"], record["subject"], record["trace_id"])
    assert encoded == encode_audit_record(record)
    # a change's write decision replaces the template's reason (audit format 2), and nothing else
    carried = template.encode(record["ts_ms"], record["source_offset"], record["subject"], record["trace_id"],
                              '{"write":"write_allowed"}')
    assert carried == encode_audit_record({**record, "reason": '{"write":"write_allowed"}'})
