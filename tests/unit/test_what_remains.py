"""Deletion confirmations say what remains of an erased customer, where and until when (finding 1):
masks and tokens stay in the published records until retention or compaction removes them."""

from __future__ import annotations

from guard.pipeline.sanitizer import REMAINING_FORMS, what_remains
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
