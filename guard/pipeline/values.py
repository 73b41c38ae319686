"""What a change's column values say to the guard beyond their protection: an amount's band (the anomaly
facts of transactions) and when a relationship ended (the retention clock of an erasure). Unreadable values
answer None: the guard never bands or erases on a guess."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any


def amount_band(value: Any, bands: Sequence[tuple[str, Decimal]]) -> str | None:
    """The highest band whose lower bound the value's magnitude reaches (None: below every band, or not a
    number). Debezium sends decimals as strings (`decimal.handling.mode = string`)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        # copy_abs, not abs(): abs() rounds in the context and raises Overflow for "1e1000000", which the
        # native path's band facts did not catch (the worker died on the record, and met it again at restart).
        amount = Decimal(str(value)).copy_abs()
    except (ArithmeticError, ValueError):  # InvalidOperation is an ArithmeticError
        return None
    if not amount.is_finite():
        return None
    found = None
    for name, bound in bands:
        if amount >= bound:
            found = name
    return found


def relationship_end_s(value: Any) -> float | None:
    """When a relationship-end column's value says the relationship ended (unix s), or None (not ended,
    or unreadable: then the data is kept, never erased on a guess).

    Debezium's forms: ISO-8601 text (timestamptz, or any column read as text), days since the epoch (date),
    milliseconds or microseconds since the epoch (timestamp).
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        if abs(v) < 1e6:
            return v * 86_400
        if abs(v) < 1e14:
            return v / 1000
        return v / 1_000_000
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None
