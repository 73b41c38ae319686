"""Deletion confirmations that a crash separated from their shred: found, checked and delivered once.

A shred writes its confirmation (and the confirmation's audit record) into the key store in the same
script (`bg:{t}:pending:{branch}`, `Sanitizer.erase`); the worker that carries them in a transaction removes
the entry once that transaction has committed. An entry still there was not (known to be) delivered:

* the worker crashed, was fenced or lost its partitions before the commit; the replay of the same delete
  re-emits the entry (`Sanitizer.erase`), but a replay may never come (the delete went to another worker
  that never re-reads it, `guard erase` died after the shred);
* the commit went through and removing the entry failed (the key store was unreachable), or
  `guard erase` published and died before removing it.

`due` picks the entries no live transaction can still carry: those of this worker's fenced predecessor
(same transactional id, another incarnation: `init_transactions` aborted its open transaction) and those
claimed longer ago than the transaction timeout plus a margin (any transaction that carried them has
committed or aborted by then). `delivered` reads `guard.deletions` (read_committed) from the
confirmations' time on and says which of them are already there; the runner removes those and re-emits
the others, with the same id, in a transaction of their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

#: Added to the transaction timeout before an entry of another live worker is taken over.
TAKEOVER_MARGIN_MS = 30_000
#: Records whose timestamp is this much before a confirmation's `at_ms` are read too (clock skew).
READ_BACK_MS = 60_000


def due(entries: Mapping[str, bytes], *, owner: str, carried: Iterable[str], now_ms: int,
        transaction_timeout_ms: int) -> dict[str, dict[str, Any]]:
    """The pending entries (subject → entry) that no live transaction can carry any more."""
    txn_id = owner.split("#", 1)[0]
    skip = set(carried)
    out: dict[str, dict[str, Any]] = {}
    for subject, raw in entries.items():
        if subject in skip:
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        entry_owner = str(entry.get("owner", ""))
        predecessor = entry_owner.split("#", 1)[0] == txn_id and entry_owner != owner
        stale = now_ms - int(entry.get("claimed_ms") or entry.get("at_ms") or 0) > (
            transaction_timeout_ms + TAKEOVER_MARGIN_MS)
        if predecessor or stale:
            out[subject] = entry
    return out


def by_topic(entries: Mapping[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Entries grouped by the topic of their confirmation (the first record of each entry)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in entries.values():
        records = entry.get("records") or [[""]]
        out.setdefault(str(records[0][0]), []).append(entry)
    return out


def delivered(client: Mapping[str, Any], topic: str, ids: set[str], since_ms: int, *,
              timeout_s: float = 30.0) -> set[str]:
    """Which confirmation ids of `ids` a committed record of `topic` carries (records from `since_ms` on).

    `client`: bootstrap and security settings (`guard.kafka_security.client_config`)."""
    if not ids:
        return set()
    consumer = Consumer({**client, "group.id": "guard-confirmations-check",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    found: set[str] = set()
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return found
        wanted = [TopicPartition(topic, p, max(0, since_ms - READ_BACK_MS)) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=10)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        assign = [tp for tp in starts if tp.offset not in (OFFSET_END, -1) and tp.offset < ends[tp.partition]]
        if not assign:
            return found
        consumer.assign(assign)
        open_parts = {tp.partition for tp in assign}
        deadline = time.monotonic() + timeout_s
        while open_parts:
            if time.monotonic() > deadline:
                raise KafkaException(f"reading {topic} back did not finish within {timeout_s:.0f} s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            partition: int = msg.partition()  # type: ignore[assignment]
            if err is not None:
                if err.code() == err._PARTITION_EOF:
                    open_parts.discard(partition)
                    continue
                raise KafkaException(err)
            value = msg.value()
            if value:
                try:
                    cid = orjson.loads(value).get("id")
                except (orjson.JSONDecodeError, AttributeError):
                    cid = None
                if cid in ids:
                    found.add(cid)
            offset: int = msg.offset()  # type: ignore[assignment]
            if offset + 1 >= ends[partition]:
                open_parts.discard(partition)
        return found
    finally:
        consumer.close()
