"""A compressed day of synthetic branch traffic with planted abuses, and the check of the alerts it raised.

`plan_day(seed, day)` writes the facts of one business day of a branch (issue 15, "How it will be checked"):
the principal registry, a transfer whose cut-off is at noon, each member of staff's earlier history (the
first-access baselines, more than the learning period before), then the day itself in time order —
tellers and managers revealing and searching within their limits inside business hours, changing a few
customers' contact details to values of their own, small and large transactions, a trickle of deletes
and DLQ records — with a handful of abuses planted at random times. The seed decides everything (which
staff, how much, when), so every run can play a day the tests never saw and still be replayed.

`check(alerts, planted)`: every planted abuse must have raised exactly one alert (one id) of its rule for
its principal or scope, and nothing else may have raised any alert.

`guard alerts rehearse` plays a plan through the live stack (the facts topic, an analyzer worker, Redis)
and prints the check; `tests/integration/test_anomaly_day.py` runs it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from guard.anomaly.facts import Fact

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class Planted:
    """One planted abuse: the rule that must fire once, and what its alert names (principal or scope part)."""

    name: str
    rule: str
    principal: str | None = None
    scope: str | None = None

    def matches(self, alert: dict[str, Any]) -> bool:
        if alert.get("rule") != self.rule:
            return False
        if self.principal is not None and alert.get("principal") != self.principal:
            return False
        return self.scope is None or self.scope in str(alert.get("scope"))


@dataclass
class Day:
    facts: list[Fact]
    planted: list[Planted]
    seed: int
    normal_facts: int = 0


@dataclass
class Report:
    """Per planted abuse the alert ids found; alerts nobody planted; whether the day passed."""

    found: dict[str, set[str]] = field(default_factory=dict)
    unexpected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(len(ids) == 1 for ids in self.found.values()) and not self.unexpected

    def lines(self) -> list[str]:
        out = [f"{'ok ' if len(ids) == 1 else 'BAD'} {name}: {len(ids)} alert(s)" for name, ids in self.found.items()]
        out += [f"BAD unexpected {a.get('rule')} principal={a.get('principal')} scope={a.get('scope')} "
                f"[{str(a.get('id'))[:12]}]" for a in self.unexpected]
        return out


def check(alerts: list[dict[str, Any]], planted: list[Planted]) -> Report:
    """Match the analyzer's alerts (decoded, every version) against the planted abuses."""
    report = Report(found={p.name: set() for p in planted})
    seen_unexpected: set[str] = set()
    for alert in alerts:
        if alert.get("type") != "alert":
            continue
        owners = [p for p in planted if p.matches(alert)]
        for p in owners:
            report.found[p.name].add(str(alert["id"]))
        if not owners and str(alert["id"]) not in seen_unexpected:
            seen_unexpected.add(str(alert["id"]))
            report.unexpected.append(alert)
    return report


def _weekday_before(day: date) -> date:
    while day.isoweekday() > 5:
        day -= timedelta(days=1)
    return day


def plan_day(seed: int, day: date | None = None, *, branch: str = "0101", timezone: str = "Asia/Shanghai",
             prefix: str = "rh") -> Day:
    """The facts of one business day (a weekday, the branch's local time) with planted abuses.

    Volumes stay under the shipped defaults (schemas/anomaly_rules.toml): per principal and day at most 10
    account and 150 contact/identity records, 3 contact changes, all to values of their own; fewer than 50
    deletes of a table an hour and 10 DLQ records in 5 minutes; everybody known, active, and seen before.
    """
    rng = random.Random(seed)
    tz = ZoneInfo(timezone)
    day = _weekday_before(day or (datetime.now(tz).date() - timedelta(days=1)))
    tag = f"{prefix}{seed % 100_000:05d}"

    def at(hh: int, mm: int = 0, ss: int = 0) -> int:
        return int(datetime.combine(day, time(hh, mm, ss), tz).timestamp() * 1000)

    def business_ms() -> int:
        return at(9) + rng.randrange(0, 8 * HOUR_MS - 60_000)

    ids = iter(range(1, 10_000_000))

    def fact(kind: str, ts: int, **kw: Any) -> Fact:
        return Fact(kind, f"{tag}:{next(ids)}", ts, branch, **kw)

    def staff(role: str, n: int) -> list[str]:
        return [f"Staff:{tag}-{role}{i:02d}" for i in range(n)]

    tellers, managers = staff("t", rng.randint(8, 14)), staff("m", rng.randint(2, 4))
    old_staff = staff("old", 2)  # the former owner's staff (bank-old): normal before the cut-off
    normal = tellers + managers + old_staff
    customers = [f"{tag}-c{i:05d}" for i in range(3000)]
    rng.shuffle(customers)
    pool = iter(customers)
    picks = rng.sample(tellers, 6)
    bulk, night, changer, disabled = picks[0], picks[1], picks[2], picks[3]
    newcomer, unknown = f"Staff:{tag}-new", f"Staff:{tag}-ghost"
    cutoff = at(12)
    cats = ["contact", "identity", "account"]

    early: list[Fact] = []
    # two weeks before (the same weekday, in business hours): the branch's first access facts start its
    # learning period (7 days), so this history is learned silently. First the unknown principal's, from
    # before the registry was fed (it never enters the registry), then the registry, then everybody's work.
    early.append(fact("access", at(10) - 14 * DAY_MS, principal=unknown, action="reveal", categories={"contact": 1}))
    for p in normal:
        owner = "bank-old" if p in old_staff else "bank-a"
        early.append(fact("principal", at(10) - 14 * DAY_MS, principal=p, attrs={"state": "active", "owner": owner}))
    early.append(fact("principal", at(10) - 14 * DAY_MS, principal=newcomer,
                      attrs={"state": "active", "owner": "bank-a"}))
    for p in normal:
        early.append(fact("access", at(10, 30) - 14 * DAY_MS, principal=p, action="reveal",
                          categories={c: 1 for c in cats}))
    early.append(fact("principal", at(0) - DAY_MS, principal=disabled,
                      attrs={"state": "disabled", "owner": "bank-a"}))
    early.append(fact("transfer", at(0) - DAY_MS,
                      attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": cutoff,
                             "state": "cut over"}))

    events: list[Fact] = []
    for p in normal:
        if p == disabled:
            continue
        limit = cutoff if p in old_staff else None
        used = dict.fromkeys(cats, 0)
        for _ in range(rng.randint(8, 25)):
            ts = business_ms() if limit is None else at(9) + rng.randrange(0, limit - at(9) - 60_000)
            category = rng.choice(cats)
            n = rng.randint(1, 2) if category == "account" else rng.randint(1, 6)
            if used[category] + n > (10 if category == "account" else 150):
                category, n = "contact", 1
            used[category] += n
            events.append(fact("access", ts, principal=p, action=rng.choice(["reveal", "reveal", "search"]),
                               subject=next(pool), count=n, categories={category: n}))
    # normal contact changes: up to 3 customers per teller, each to a value (token) of its own
    changed: list[str] = []
    for p in tellers:
        if p in (changer, disabled):
            continue
        for _ in range(rng.randint(0, 2)):
            subject = next(pool)
            changed.append(subject)
            events.append(fact("write", business_ms(), principal=p, action="update", subject=subject,
                               table="public.customers", columns=["mobile"], tokens={"mobile": f"tok-{subject}"},
                               categories={"contact": 1}))
    # transactions: small ones after contact changes, large ones of customers whose details did not change
    for subject in changed:
        events.append(fact("transaction", at(16, 59), subject=subject, table="public.transactions",
                           attrs={"amount_band": "normal"}))
    for _ in range(rng.randint(3, 8)):
        events.append(fact("transaction", business_ms(), subject=next(pool), table="public.transactions",
                           attrs={"amount_band": "large"}))
    # a trickle of deletes (erasures by the catalog) and DLQ records
    for _ in range(rng.randint(10, 30)):
        events.append(fact("delete", business_ms(), action="delete", table="public.accounts", subject=next(pool)))
    for _ in range(rng.randint(0, 4)):
        events.append(fact("dlq", business_ms(), reason="bad_json"))
    normal_count = len(events)

    planted: list[Planted] = []

    def plant(name: str, rule: str, facts: list[Fact], *, principal: str | None = None,
              scope: str | None = None) -> None:
        events.extend(facts)
        planted.append(Planted(name, rule, principal, scope))

    h = rng.randint(10, 15)
    plant("bulk export of account records", "bulk_access",
          [fact("access", at(h, 5 * i), principal=bulk, action="export", count=10, categories={"account": 10})
           for i in range(3)], principal=bulk)
    plant("former owner's staff after the cut-off", "access_after_transfer_cutoff",
          [fact("access", cutoff + rng.randrange(HOUR_MS, 4 * HOUR_MS), principal=old_staff[0], action="reveal",
                subject=next(pool), categories={"contact": 1})], principal=old_staff[0])
    plant("reveals at night", "outside_business_hours",
          [fact("access", at(22, rng.randint(0, 50)) + i * 1000, principal=night, action="reveal",
                subject=next(pool), categories={"contact": 1}) for i in range(3)], principal=night)
    plant("one operator changes many mobiles", "contact_changes_by_one_operator",
          [fact("write", business_ms(), principal=changer, action="update", subject=(s := next(pool)),
                table="public.customers", columns=["mobile"], tokens={"mobile": f"tok-{s}"},
                categories={"contact": 1}) for _ in range(7)], principal=changer)
    same = f"tok-same-{tag}"
    helpers = [p for p in tellers if p not in (changer, disabled)][:3]
    plant("three customers given the same mobile", "contact_same_value_many_customers",
          [fact("write", at(11, 10 * i), principal=p, action="update", subject=next(pool), table="public.customers",
                columns=["mobile"], tokens={"mobile": same}, categories={"contact": 1})
           for i, p in enumerate(helpers)], scope=same)
    victim = next(pool)
    plant("contact change then a large transaction", "contact_change_then_large_transaction",
          [fact("write", at(10, 30), principal=managers[0], action="update", subject=victim, table="public.customers",
                columns=["mobile"], tokens={"mobile": f"tok-{victim}"}, categories={"contact": 1}),
           fact("transaction", at(13, 45), subject=victim, table="public.transactions",
                attrs={"amount_band": "large"})], scope=victim)
    sh = rng.randint(10, 15)
    plant("deletion spike", "deletion_spike",
          [fact("delete", at(sh, 10) + i * 20_000, action="delete", table="public.transactions", subject=next(pool))
           for i in range(60)], scope="public.transactions")
    dm = 5 * rng.randint(0, 11)
    plant("DLQ spike", "dlq_spike",
          [fact("dlq", at(16, dm, 10) + i * 5_000, reason="decode_failed") for i in range(14)], scope="dlq")
    plant("a disabled principal reads", "disabled_principal",
          [fact("access", business_ms(), principal=disabled, action="reveal", subject=next(pool),
                categories={"contact": 1})], principal=disabled)
    plant("a principal nobody registered reads", "unknown_principal",
          [fact("access", business_ms(), principal=unknown, action="search", subject=next(pool),
                categories={"contact": 1})], principal=unknown)
    plant("a newcomer's first access to the branch", "first_access_branch",
          [fact("access", business_ms(), principal=newcomer, action="reveal", subject=next(pool),
                categories={"contact": 1})], principal=newcomer)
    events.sort(key=lambda f: f.ts_ms)
    return Day(early + events, planted, seed, normal_count)
