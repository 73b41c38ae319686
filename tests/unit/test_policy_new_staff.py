"""A member of staff added to the branch database counts from their first request, not 30 s later.

Found by issue 14's acceptance scenario: staff defined in `public.staff`/`public.staff_roles` whose first
write reached the worker before its 30-s refresh of the staff source were decided `write_denied`
(unknown entity) and raised a false anomaly. A request by a principal the entities don't hold now reads
the source again at once, at most every `unknown_refresh_s`, so an unknown principal can't hammer it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities

WHEN = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CUSTOMERS = ("Table", "0101:public.customers")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The staff tables: rows can be added while the engine runs; reads are counted."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool, list[str]]] = [("t1", "0101", "bank-a", True, ["teller"])]
        self.reads = 0

    def __call__(self) -> list[dict[str, Any]]:
        self.reads += 1
        return staff_entities(self.rows)


def ctx() -> dict[str, object]:
    return {"time": WHEN, "purpose": "branch_operation", "source": "cdc", "volume": 1}


def test_new_staff_are_read_at_their_first_request() -> None:
    source, clock = Source(), Clock()
    engine = PolicyEngine(default_directory(), entity_source=source, clock=clock)
    assert engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx()).allowed
    reads = source.reads
    source.rows.append(("k2", "0101", "bank-a", True, ["teller"]))
    clock.now += 1  # long before the periodic refresh (30 s)
    engine.maybe_reload()
    d = engine.decide(("Staff", "k2"), "write", CUSTOMERS, ctx())
    assert d.allowed and d.policies == ("teller-writes-own-branch",), d
    assert source.reads == reads + 1
    assert engine.knows(("Staff", "k2"))


def test_an_unknown_principal_reads_the_source_at_most_every_few_seconds() -> None:
    source, clock = Source(), Clock()
    engine = PolicyEngine(default_directory(), entity_source=source, clock=clock, unknown_refresh_s=5)
    reads = source.reads
    for second in range(12):
        clock.now += 1
        ask = {**ctx(), "time": datetime(2026, 12, 3, 12, 0, second, tzinfo=UTC)}  # a new cache bucket each time
        d = engine.decide(("Staff", "ghost"), "write", CUSTOMERS, ask)
        assert not d.allowed
    assert source.reads - reads == 3  # at 1, 6 and 11 s
    assert engine.decide(("Staff", "t1"), "write", CUSTOMERS, ctx()).allowed
    assert source.reads - reads == 3  # known principals never trigger a read
