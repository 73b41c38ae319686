"""The decode stage: a raw Debezium value becomes a `ChangeEvent` (or None for a tombstone).

A batch may be decoded ahead (`keep`) so its data keys load in one round trip; `decode` then hands out
the event decoded ahead for that very bytes object, or decodes the value now.
"""

from __future__ import annotations

from typing import Any

from guard.cdc.envelope import ChangeEvent, decode_value


class Decoder:
    """Decodes change events, once each: what was decoded ahead is used, never decoded again."""

    def __init__(self) -> None:
        #: Decoded ahead: (the value bytes object, its ChangeEvent or parsed JSON). An entry is only used
        #: for that very bytes object, so a stale entry can never stand in for another record's value.
        self._predecoded: dict[tuple[str, int, int], tuple[bytes | None, Any]] = {}

    def decode(self, topic: str, partition: int, offset: int, value: bytes | None) -> ChangeEvent | None:
        """The record's event: decoded ahead if it was, else now (raises `DecodeError`; None: tombstone)."""
        entry = self._predecoded.pop((topic, partition, offset), None) if self._predecoded else None
        pre = entry[1] if entry is not None and entry[0] is value else None
        if isinstance(pre, ChangeEvent):
            return pre
        return decode_value(value)

    def keep(self, topic: str, partition: int, offset: int, value: bytes | None, event: Any) -> None:
        """Remember what `value` decoded to, for the `decode` of this record."""
        self._predecoded[(topic, partition, offset)] = (value, event)

    def forget(self, topic: str, partition: int, offset: int) -> None:
        self._predecoded.pop((topic, partition, offset), None)

    def clear(self) -> None:
        self._predecoded.clear()
