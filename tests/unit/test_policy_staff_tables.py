"""The staff tables are the policy's own entities: a teller's allowed writes must not reach them.

Found by issue 14's acceptance scenario: `teller-writes-own-branch` permitted a teller's insert into
`public.staff_roles`, so a teller could make themselves a compliance officer (the staff source reads the
table every 30 s) with a write the audit recorded as `write_allowed` and no alert.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities

WHEN = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    e = PolicyEngine(default_directory())
    e.add_entities(staff_entities([("t1", "0101", "bank-a", True, ["teller"]),
                                   ("m1", "0101", "bank-a", True, ["manager"]),
                                   ("h1", "0101", "bank-a", True, ["hr"]), ("hb", "0101", "bank-b", True, ["hr"])]))
    assert e.knows(("Table", "0101:public.staff")) and e.knows(("Table", "0101:public.staff_roles"))
    return e


def decide(engine: PolicyEngine, who: str, action: str, table: str):  # type: ignore[no-untyped-def]
    return engine.decide(("Staff", who), action, ("Table", f"0101:{table}"),
                         {"time": WHEN, "purpose": "branch_operation", "source": "cdc", "volume": 1})


@pytest.mark.parametrize("who", ["t1", "m1"])
@pytest.mark.parametrize("table", ["public.staff", "public.staff_roles"])
def test_tellers_and_managers_do_not_write_the_staff_tables(engine: PolicyEngine, who: str, table: str) -> None:
    for action in ("write", "delete"):
        d = decide(engine, who, action, table)
        assert not d.allowed and d.policies == ("staff-tables-only-by-hr",), (who, action, d)


def test_hr_of_the_owner_writes_the_staff_tables_and_nothing_else(engine: PolicyEngine) -> None:
    d = decide(engine, "h1", "write", "public.staff_roles")
    assert d.allowed and d.policies == ("hr-writes-staff-tables",)
    assert decide(engine, "h1", "delete", "public.staff").allowed
    assert not decide(engine, "hb", "write", "public.staff_roles").allowed  # HR of another organisation
    assert not decide(engine, "h1", "write", "public.customers").allowed


def test_other_tables_are_unchanged(engine: PolicyEngine) -> None:
    assert decide(engine, "t1", "write", "public.customers").allowed
    assert decide(engine, "m1", "delete", "public.customers").allowed
