"""Compliance reveals and searches stay within the organisation that owns the branch.

Found by issue 14's acceptance scenario: `compliance-reveals-for-investigation` had no condition on who the
compliance officer works for, so another bank's compliance officer at another branch revealed branch
0101's customers, and `search-for-service-and-kyc` let any organisation's tellers look up the owner's
blind-index tokens, against "nobody another branch's customers" (README, docs/reveal.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.model import subject_entity
from guard.policy.sources import staff_entities

WHEN = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SUBJECT = subject_entity("0101", "token-42")
SEARCH = subject_entity("0101", "search")


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    e = PolicyEngine(default_directory())
    e.add_entities(staff_entities([
        ("c-own", "0101", "bank-a", True, ["compliance"]),     # the owner's, at the branch
        ("c-hq", "0303", "bank-a", True, ["compliance"]),      # the owner's, elsewhere (head office)
        ("c-acq", "0101", "bank-b", True, ["compliance"]),     # the acquirer's, posted at the branch
        ("c-other", "0102", "bank-b", True, ["compliance"]),   # another bank's, at another branch
        ("t-own", "0303", "bank-a", True, ["teller"]),
        ("t-other", "0102", "bank-b", True, ["teller"]),
    ]))
    return e


def reveal(engine: PolicyEngine, who: str):  # type: ignore[no-untyped-def]
    return engine.decide(("Staff", who), "reveal", ("DataSubject", "0101:token-42"),
                         {"time": WHEN, "purpose": "aml_investigation", "source": "reveal-api", "volume": 1,
                          "field_class": "C2"}, entities=[SUBJECT])


def search(engine: PolicyEngine, who: str):  # type: ignore[no-untyped-def]
    return engine.decide(("Staff", who), "search", ("DataSubject", "0101:search"),
                         {"time": WHEN, "purpose": "customer_service", "source": "reveal-api", "volume": 1,
                          "field_class": "C2"}, entities=[SEARCH])


@pytest.mark.parametrize(("who", "allowed"), [("c-own", True), ("c-hq", True), ("c-acq", True),
                                              ("c-other", False)])
def test_compliance_reveals_for_the_owner_or_at_the_branch(engine: PolicyEngine, who: str, allowed: bool) -> None:
    d = reveal(engine, who)
    assert d.allowed is allowed, d
    if allowed:
        assert d.policies == ("compliance-reveals-for-investigation",)


@pytest.mark.parametrize(("who", "allowed"), [("t-own", True), ("c-own", True), ("t-other", False),
                                              ("c-acq", False)])
def test_only_the_owners_staff_search(engine: PolicyEngine, who: str, allowed: bool) -> None:
    d = search(engine, who)
    assert d.allowed is allowed, d
