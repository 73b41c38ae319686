"""The rehearsal day's plan and its check (guard/anomaly/rehearsal.py); the live run is
tests/integration/test_anomaly_day.py."""

from __future__ import annotations

from collections import Counter
from datetime import date

import orjson

from guard.anomaly.facts import Fact
from guard.anomaly.rehearsal import Planted, check, plan_day


def test_the_seed_decides_the_day() -> None:
    a, b = plan_day(7, date(2026, 12, 1)), plan_day(7, date(2026, 12, 1))
    assert [f.to_json() for f in a.facts] == [f.to_json() for f in b.facts]
    c = plan_day(8, date(2026, 12, 1))
    assert [f.to_json() for f in a.facts] != [f.to_json() for f in c.facts]


def test_a_day_is_a_weekday_with_every_rule_planted_once() -> None:
    day = plan_day(11, date(2026, 12, 6))  # a Sunday: the day played is the Friday before
    rules = Counter(p.rule for p in day.planted)
    assert set(rules) == {"bulk_access", "access_after_transfer_cutoff", "outside_business_hours",
                          "contact_changes_by_one_operator", "contact_same_value_many_customers",
                          "contact_change_then_large_transaction", "deletion_spike", "dlq_spike",
                          "disabled_principal", "unknown_principal", "first_access_branch"}
    assert all(n == 1 for n in rules.values())
    assert day.normal_facts > 200
    assert len({f.id for f in day.facts}) == len(day.facts), "fact ids are unique"
    for f in day.facts:
        assert Fact.from_mapping(orjson.loads(f.to_json())).id == f.id


def test_check_wants_exactly_one_alert_per_abuse_and_nothing_else() -> None:
    planted = [Planted("bulk", "bulk_access", principal="Staff:x"), Planted("spike", "deletion_spike", scope="t1")]
    alert = {"type": "alert", "rule": "bulk_access", "principal": "Staff:x", "scope": "principal=Staff:x", "id": "a"}
    spike = {"type": "alert", "rule": "deletion_spike", "principal": None, "scope": "table=t1", "id": "b"}
    assert check([alert, {**alert, "version": 2}, spike], planted).ok, "versions of one alert are one alert"
    assert not check([alert], planted).ok, "a planted abuse without its alert"
    assert not check([alert, {**alert, "id": "c"}, spike], planted).ok, "two alerts for one abuse"
    stray = {**spike, "rule": "outside_business_hours", "id": "d"}
    report = check([alert, spike, stray], planted)
    assert not report.ok and [a["id"] for a in report.unexpected] == ["d"]
    assert check([alert, spike, {"type": "anomaly", "rule": "schema_drift"}], planted).ok, "not an analyzer alert"
