"""Kafka's own partition arithmetic, where the guard must land where Kafka does.

Which `__consumer_offsets` partition holds a group's offsets (the one to watch for a hanging transaction,
and the one to name when a group's committed offsets can't be read) is Kafka's `partitionFor`: Java's
`String.hashCode()` of the group id, made non-negative the way Kafka's `Utils.abs` does, modulo the
topic's partition count. The same hash spreads the side alerts over the anomalies topic's partitions.
"""

from __future__ import annotations


def java_string_hash(text: str) -> int:
    """Java's `String.hashCode()` (over UTF-16 code units), as a signed 32-bit int."""
    h = 0
    data = text.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + ((data[i] << 8) | data[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def group_offsets_partition(group_id: str, partitions: int) -> int:
    """The `__consumer_offsets` partition that holds `group_id`'s offsets (Kafka's `partitionFor`)."""
    h = java_string_hash(group_id)
    return (0 if h == -(1 << 31) else abs(h)) % partitions
