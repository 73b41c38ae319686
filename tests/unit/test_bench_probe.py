"""The latency probe's fast ts_ms reader must agree with the full decoder."""

from hypothesis import given, settings
from hypothesis import strategies as st

from guard.bench.dblatency import sanitized_source
from guard.bench.latency import sanitized_ts
from guard.records.codec import AvroCodec, decode


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**62), st.text(max_size=300), st.text(max_size=40), st.sampled_from("cudr"))
def test_sanitized_ts_reads_what_decode_reads(ts_ms, db, table, op):
    codec = AvroCodec("sanitized_change")
    value = codec.encode({"v": 1, "op": op, "table": table, "branch": "0101", "db": db, "ts_ms": ts_ms,
                          "source_ts_ms": None, "position": "lsn:1", "subject": None, "before": None,
                          "after": None, "unclassified": []})
    assert sanitized_ts(value) == decode(value)["ts_ms"] == ts_ms


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**62), st.one_of(st.none(), st.integers(0, 2**62)), st.text(max_size=60), st.text(max_size=40))
def test_sanitized_source_reads_the_commit_time_and_position_decode_reads(ts_ms, source_ts_ms, position, db):
    """The commit-latency probe's reader of `source_ts_ms` and `position` agrees with the full decoder."""
    codec = AvroCodec("sanitized_change")
    value = codec.encode({"v": 1, "op": "c", "table": "public.transactions", "branch": "0101", "db": db,
                          "ts_ms": ts_ms, "source_ts_ms": source_ts_ms, "position": position, "subject": None,
                          "before": None, "after": None, "unclassified": []})
    decoded = decode(value)
    assert sanitized_source(value) == (decoded["source_ts_ms"], decoded["position"]) == (source_ts_ms, position)
