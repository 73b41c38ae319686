"""An erasure's confirmation records: what stays readable of the customer and until when (`what_remains`),
and the key store's copy of a confirmation until a committed write carries it (`pending_entry`,
`pending_records`; docs/erasure.md)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from guard.records.builders import OutRecord


def pending_entry(confirmation_id: str, at_ms: int, owner: str, source: tuple[str, int, int] | None,
                  records: Sequence[OutRecord], claimed_ms: int) -> bytes:
    """The key store's copy of a confirmation and its audit record, until a committed write carries them."""
    return orjson.dumps({
        "id": confirmation_id, "at_ms": at_ms, "owner": owner, "claimed_ms": claimed_ms,
        "source": None if source is None else list(source),
        "records": [[r.topic, None if r.key is None else base64.b64encode(r.key).decode(),
                     None if r.value is None else base64.b64encode(r.value).decode(), r.partition]
                    for r in records]})


def pending_records(entry: Mapping[str, Any]) -> list[OutRecord]:
    """The records of a pending entry, with the confirmation's time as their timestamp (so a reader can
    find them from `at_ms` on)."""
    return [OutRecord(topic, None if key is None else base64.b64decode(key),
                      None if value is None else base64.b64decode(value),
                      partition=rest[0] if rest else None, timestamp=int(entry["at_ms"]))
            for topic, key, value, *rest in entry["records"]]


#: What a sanitized record keeps readable of a customer once the data key is destroyed.
REMAINING_FORMS = [
    "display masks of masked columns (e.g. 138****1234, first 6 + last 4 of a card, surname only, district)",
    "blind indexes of indexed columns (keyed tokens: their keys never leave the guard)",
    "the subject token and the tokenised Kafka keys",
    "columns the catalog allows in clear (C1: surrogate ids, dates, status codes)",
]


def what_remains(topics: Iterable[str], topic_configs: Callable[[str], Mapping[str, str] | None],
                 tombstones: Sequence[OutRecord], now_ms: int, *, sealed: bool = True) -> list[dict[str, Any]]:
    """Per topic: what stays readable of an erased customer, and until when (from the topic's configuration).

    Each entry has the confirmation's common `where` / `what` / `until` (`RecordBuilder.deletion` adds the
    places outside the sanitized topics) and, per topic, `sealed_fields`, `readable`, `cleanup_policy`,
    `until_ms` and, for a compacted topic, `tombstones_written`. `sealed=False`: no key was ever destroyed
    (outcome `no_keys`), so no sealed field is claimed unreadable.

    Sealed fields are unreadable everywhere once the key is gone; masks and tokens remain until the records
    that carry them leave the topic: by retention (a `delete` topic: at the latest `retention.ms` after the
    newest record of a segment, and a segment closes `segment.ms` after it opened) or by compaction (a
    `compact` topic: the erasure's tombstones make the cleaner drop the customer's records, within
    `max.compaction.lag.ms` when that is set).
    """
    tombstoned: dict[str, int] = {}
    for record in tombstones:
        tombstoned[record.topic] = tombstoned.get(record.topic, 0) + 1
    out = []
    for topic in sorted(topics):
        configs = topic_configs(topic)
        entry: dict[str, Any] = {
            "where": topic, "topic": topic,
            "what": ("sealed fields unreadable (key destroyed); " if sealed else "")
            + "display masks, blind indexes and the subject token remain (pseudonymised, PIPL Art. 73)",
            "sealed_fields": "unreadable: key destroyed" if sealed else "none: no key was held for the subject",
            "readable": REMAINING_FORMS}
        if configs is None:
            entry["until"] = "unknown: the topic's configuration could not be read; ask the Kafka operator"
            out.append(entry)
            continue
        policy = configs.get("cleanup.policy", "delete")
        entry["cleanup_policy"] = policy
        if "compact" in policy:
            entry["tombstones_written"] = tombstoned.get(topic, 0)
            lag = int(configs.get("max.compaction.lag.ms", "9223372036854775807"))
            if lag < 2**62:
                entry["until_ms"] = now_ms + lag
                entry["until"] = "compaction removes them within max.compaction.lag.ms"
            else:
                entry["until"] = ("when the log cleaner next compacts the topic (no max.compaction.lag.ms set: "
                                  "no upper bound; set one to bound it)")
        if "delete" in policy:
            retention = int(configs.get("retention.ms", "604800000"))
            if retention < 0:
                entry.setdefault("until", "indefinitely: retention.ms = -1 (the topic keeps records forever)")
            else:
                segment = int(configs.get("segment.ms", "604800000"))
                entry["until_ms"] = min(entry.get("until_ms", 2**62), now_ms + segment + retention)
                entry["until"] = "deleted by retention at the latest by until_ms (retention.ms + segment.ms)"
        out.append(entry)
    return out
