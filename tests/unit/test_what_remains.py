"""Deletion confirmations say what remains of an erased customer, where and until when (finding 1):
masks and tokens stay in the published records until retention or compaction removes them."""

from __future__ import annotations

from guard.pipeline.erasure_records import REMAINING_FORMS, what_remains
from guard.records.builders import OutRecord

NOW = 1_800_000_000_000


def test_a_delete_topic_keeps_them_until_retention_plus_one_segment():
    configs = {"t": {"cleanup.policy": "delete", "retention.ms": "86400000", "segment.ms": "3600000"}}
    [entry] = what_remains(["t"], configs.get, [], NOW)
    assert entry["cleanup_policy"] == "delete" and entry["until_ms"] == NOW + 86_400_000 + 3_600_000
    assert entry["readable"] == REMAINING_FORMS and "unreadable" in entry["sealed_fields"]
    assert any("mask" in form for form in entry["readable"]) and any("blind index" in f for f in entry["readable"])


def test_a_compacted_topic_counts_its_tombstones_and_its_bound():
    tombs = [OutRecord("c", b"k1", None, 0), OutRecord("c", b"k2", None, 0), OutRecord("d", b"k", None, 0)]
    unbounded = {"c": {"cleanup.policy": "compact"}}
    [entry] = what_remains(["c"], unbounded.get, tombs, NOW)
    assert entry["tombstones_written"] == 2 and "until_ms" not in entry and "no upper bound" in entry["until"]
    bounded = {"c": {"cleanup.policy": "compact", "max.compaction.lag.ms": "600000"}}
    [entry] = what_remains(["c"], bounded.get, tombs, NOW)
    assert entry["until_ms"] == NOW + 600_000


def test_forever_and_unknown_are_said_as_such():
    configs = {"f": {"cleanup.policy": "delete", "retention.ms": "-1"}}
    forever, unknown = what_remains(["f", "u"], configs.get, [], NOW)
    assert "indefinitely" in forever["until"] and "until_ms" not in forever
    assert unknown["topic"] == "u" and unknown["until"].startswith("unknown")


# --- merged with erasure-13: one `remains`, tombstones carried by the pending entry, one DLQ key ---------
def test_a_confirmation_lists_each_topic_with_its_date_and_then_every_other_place():
    """The per-topic entries (dates from the topic configs) replace the generic ones; the places outside the
    sanitized topics (audit, DLQ, raw topics, key store, caches, branch DB) are always there."""
    import orjson

    from guard.config import Settings
    from guard.keys.primitives import Hmac
    from guard.records.builders import RecordBuilder

    class _Keys:
        tenant = "t"
        dlq_hash = Hmac(b"h" * 32)

    topic = "sanitized.br0101.public.customers"
    configs = {topic: {"cleanup.policy": "delete", "retention.ms": "1000", "segment.ms": "10"}}
    per_topic = what_remains([topic], configs.get, [], NOW)
    builder = RecordBuilder(Settings(worker_id="w1"), _Keys(), clock=lambda: NOW / 1000)  # type: ignore[arg-type]
    records = builder.deletion("s" * 32, confirmation_id="c1", outcome="shredded", held=False, destroyed=1,
                               known_topics=[topic], trigger="erase_command", reason_code="subject_request",
                               reason="r", by="dpo", source=None, now_ms=NOW, remains=per_topic)
    remains = orjson.loads(records[0].value or b"")["remains"]
    assert [e for e in remains if e["where"] == topic] == per_topic  # not also a generic entry
    assert per_topic[0]["until_ms"] == NOW + 1010 and per_topic[0]["what"] and per_topic[0]["until"]
    assert {"guard.audit", "guard.dlq", "key store append-only file", "the branch database"} <= {
        e["where"] for e in remains}
    assert all(e["where"] and e["what"] and e["until"] for e in remains)


def test_no_keys_claims_no_sealed_field_unreadable():
    [entry] = what_remains(["t"], {"t": {"cleanup.policy": "delete"}}.get, [], NOW, sealed=False)
    assert "unreadable" not in entry["what"] and entry["sealed_fields"].startswith("none")


def test_a_pending_entry_keeps_the_tombstones_partition():
    """A crash before the commit re-emits the pending entry: its tombstones must go to the partition of the
    records they remove, or compaction never removes them."""
    import orjson

    from guard.pipeline.erasure_records import pending_entry, pending_records

    records = [OutRecord("guard.deletions", b"s", b'{"id": "c1"}'), OutRecord("sanitized.c", b"k", None, 3)]
    back = pending_records(orjson.loads(pending_entry("c1", 99, "txn#1", None, records, 100)))
    assert [(r.topic, r.key, r.value, r.partition) for r in back] == [
        ("guard.deletions", b"s", b'{"id": "c1"}', None), ("sanitized.c", b"k", None, 3)]
    # an entry written before partitions were stored still reads
    old = {"at_ms": 5, "records": [["guard.deletions", None, None]]}
    assert pending_records(old)[0].partition is None
