"""Each anomaly rule against the real Redis of the stack: a scenario triggers it, normal traffic next to it
does not; a replayed fact changes nothing; a continuing condition keeps one alert id.

The facts are what the reveal service, the policy engine and the sanitizer write (guard/anomaly/facts.py);
the Kafka path (faust agents reading real topics) is tested in test_anomaly_stream.py.
"""

from __future__ import annotations

import itertools
import tomllib
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from guard.anomaly.alerts import alert_id
from guard.anomaly.engine import Analyzer, Emit
from guard.anomaly.facts import Fact, from_audit, from_dlq, from_legacy_anomaly, from_sanitized
from guard.anomaly.rules import RuleConfig, default_rules_path
from guard.anomaly.state import AnomalyState
from guard.keys.redis_client import redis_client
from guard.keys.store import RedisKeyStore
from tests.integration.kafka_helpers import admin_redis_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack: dict[str, str]) -> dict[str, str]:
    """The stack with Redis as its admin: these tests give each test a tenant of its own."""
    return {**stack, **admin_redis_env(stack)}

SH = ZoneInfo("Asia/Shanghai")
#: Tuesday 2026-12-01, 10:00 in Shanghai: inside business hours.
DAY = datetime(2026, 12, 1, 10, 0, tzinfo=SH)
T0 = int(DAY.timestamp() * 1000)
_ids = itertools.count()


def fact(kind: str, *, ts: int = T0, branch: str = "0101", **kw: Any) -> Fact:
    return Fact(kind, f"test:{uuid.uuid4().hex[:8]}:{next(_ids)}", ts, branch, **kw)


@pytest.fixture()
def analyzer(stack: dict[str, str]) -> Analyzer:
    """An analyzer over a fresh tenant (its own Redis keys) with the shipped default rules."""
    store = RedisKeyStore(stack["GUARD_REDIS_URL"], "demo-bank",
                          password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    state = AnomalyState(store.client, f"t{uuid.uuid4().hex[:10]}")
    clock = [T0 / 1000]
    # a one-day learning period for first accesses (the shipped default is 7 days)
    rules = RuleConfig(tomllib.loads(default_rules_path().read_text() + '\n[branches."0101".first_access]\n'
                                     'learn_s = 86400\n'))
    a = Analyzer(state, rules, is_held=store.is_held, clock=lambda: clock[0])
    for p in ("teller-1", "teller-2", "teller-3", "mgr-9"):  # the principal registry
        a.process(Fact("principal", f"reg:{p}", T0 - 86_400_000, "0101", principal=p,
                       attrs={"state": "active", "owner": "bank-a"}))
    # the normal principals were seen before (first-access baselines)
    for p in ("teller-1", "teller-2", "mgr-9"):
        a.process(fact("access", ts=T0 - 2 * 86_400_000, principal=p, action="reveal",
                       categories={"contact": 1, "account": 1, "transaction": 1}))
    return a


def rules_of(emits: list[Emit]) -> Counter[str]:
    return Counter(e.record["rule"] for e in emits)


def run(a: Analyzer, facts: list[Fact]) -> list[Emit]:
    out = []
    for f in facts:
        emits = a.process(f)
        for e in emits:
            a.emitted(e)
        out += emits
    return out


def normal_reveals(n: int = 10, principal: str = "teller-2") -> list[Fact]:
    return [fact("access", ts=T0 + i * 60_000, principal=principal, action="reveal", subject=f"s{i}",
                 categories={"contact": 1}) for i in range(n)]


def test_bulk_export_crosses_the_category_threshold_once(analyzer: Analyzer) -> None:
    normal = run(analyzer, normal_reveals(20))
    assert not normal
    # teller-1 exports 10 account records at a time: the daily ceiling is 25 account records
    exports = [fact("access", ts=T0 + i * 60_000, principal="teller-1", action="export", count=10,
                    categories={"account": 10}) for i in range(8)]
    emits = run(analyzer, exports)
    assert set(rules_of(emits)) == {"bulk_access"}
    ids = {e.id for e in emits}
    assert len(ids) == 1, "a continuing condition must keep one alert"
    last = analyzer.state.alert_state(ids.pop())
    assert last is not None and last["count"] == 80 and last["threshold"] == 25
    # replaying every fact (at-least-once) changes no count and writes nothing new
    assert not run(analyzer, exports)
    assert analyzer.state.alert_state(emits[0].id)["count"] == 80  # type: ignore[index]


def test_first_access_to_branch_and_category(analyzer: Analyzer) -> None:
    assert not run(analyzer, normal_reveals(5))
    emits = run(analyzer, [fact("access", principal="teller-3", action="reveal", categories={"credit": 1}),
                           fact("access", principal="teller-3", action="reveal", categories={"credit": 1})])
    assert rules_of(emits) == Counter({"first_access_branch": 1, "first_access_category": 1})
    # within the learning period (a day from the branch's first access fact) a newcomer is only recorded
    learned = run(analyzer, [fact("access", ts=T0 - 2 * 86_400_000 + 3_600_000, principal="teller-4",
                                  action="reveal", categories={"credit": 1})])
    assert not [e for e in learned if e.record["rule"].startswith("first_access")]


def test_unknown_and_disabled_principals(analyzer: Analyzer) -> None:
    assert not run(analyzer, normal_reveals(5))
    analyzer.process(Fact("principal", "reg:teller-2-off", T0, "0101", principal="teller-2",
                          attrs={"state": "disabled", "owner": "bank-a"}))
    emits = run(analyzer, [fact("access", ts=T0 + 1000, principal="teller-2", action="reveal",
                                categories={"contact": 1}),
                           fact("access", ts=T0 + 2000, principal="ghost", action="search",
                                categories={"contact": 1})])
    rules = rules_of(emits)
    assert rules["disabled_principal"] == 1 and rules["unknown_principal"] == 1


def test_outside_business_hours_in_the_branch_time_zone(analyzer: Analyzer) -> None:
    # 16:30 Shanghai is 08:30 UTC: inside hours although the UTC clock says early morning
    inside = int(datetime(2026, 12, 1, 16, 30, tzinfo=SH).timestamp() * 1000)
    assert not run(analyzer, [fact("access", ts=inside, principal="teller-1", action="reveal",
                                   categories={"contact": 1})])
    # 22:00 Shanghai is 14:00 UTC (inside "UTC business hours"): outside the branch's hours
    night = int(datetime(2026, 12, 1, 22, 0, tzinfo=SH).timestamp() * 1000)
    emits = run(analyzer, [fact("access", ts=night + i * 1000, principal="teller-1", action="reveal",
                                categories={"contact": 1}) for i in range(5)])
    assert {e.record["rule"] for e in emits} == {"outside_business_hours"}
    assert len({e.id for e in emits}) == 1


def test_one_operator_changes_many_mobiles(analyzer: Analyzer) -> None:
    normal = [fact("write", principal="teller-2", action="update", subject=f"n{i}", columns=["mobile"],
                   tokens={"mobile": f"tok-n{i}"}) for i in range(4)]
    assert not run(analyzer, normal)
    abuse = [fact("write", ts=T0 + i * 1000, principal="teller-1", action="update", subject=f"c{i}",
                  columns=["mobile"], tokens={"mobile": f"tok-c{i}"}) for i in range(8)]
    emits = run(analyzer, abuse)
    assert set(rules_of(emits)) == {"contact_changes_by_one_operator"}
    assert analyzer.state.alert_state(emits[0].id)["count"] == 8  # type: ignore[index]


def test_several_customers_changed_to_the_same_mobile_token(analyzer: Analyzer) -> None:
    assert not run(analyzer, [fact("write", principal=f"teller-{i % 2 + 1}", subject=f"x{i}", columns=["mobile"],
                                   tokens={"mobile": f"t{i}"}) for i in range(3)])
    emits = run(analyzer, [fact("write", principal=f"teller-{i % 2 + 1}", subject=f"v{i}", columns=["mobile"],
                                tokens={"mobile": "same-token"}) for i in range(3)])
    assert rules_of(emits) == Counter({"contact_same_value_many_customers": 1})
    assert ("token", "mobile:same-token") in analyzer.state.evidence(emits[0].id)


def test_contact_change_then_large_transaction(analyzer: Analyzer) -> None:
    run(analyzer, [fact("write", principal="teller-2", subject="victim", columns=["mobile"],
                        tokens={"mobile": "tv"})])
    # a large transaction on another customer, and a small one on the victim: nothing
    assert not run(analyzer, [fact("transaction", ts=T0 + 3_600_000, subject="other", attrs={"amount_band": "large"}),
                              fact("transaction", ts=T0 + 3_600_000, subject="victim", attrs={"amount_band": "small"})])
    emits = run(analyzer, [fact("transaction", ts=T0 + 7_200_000, subject="victim", attrs={"amount_band": "large"})])
    assert [e.record["rule"] for e in emits] == ["contact_change_then_large_transaction"]
    assert emits[0].severity == "critical"


def test_large_transaction_read_before_the_contact_change(analyzer: Analyzer) -> None:
    """The two facts come from different topics: read in either order, the rule raises one alert."""
    txn = fact("transaction", ts=T0 + 3_600_000, subject="victim-2", attrs={"amount_band": "large"})
    assert not run(analyzer, [txn]), "no contact change known yet"
    later = fact("write", ts=T0 + 2 * 86_400_000, principal="teller-2", subject="victim-2", columns=["mobile"],
                 tokens={"mobile": "tw"})
    assert not run(analyzer, [later]), "a change after the transaction is no takeover pattern"
    change = fact("write", ts=T0, principal="teller-2", subject="victim-2", columns=["mobile"], tokens={"mobile": "tv"})
    emits = run(analyzer, [change])
    assert [e.record["rule"] for e in emits] == ["contact_change_then_large_transaction"]
    # the same pair in the usual order (a replay of the transaction) updates the same alert, no second one
    assert {e.id for e in run(analyzer, [txn])} <= {emits[0].id}


def test_deletion_spike_unexplained_and_legal_hold(analyzer: Analyzer, stack: dict[str, str]) -> None:
    assert not run(analyzer, [fact("delete", table="public.accounts", subject=f"d{i}") for i in range(10)])
    spike = run(analyzer, [fact("delete", ts=T0 + i, table="public.transactions", subject=f"e{i}")
                           for i in range(60)])
    assert set(rules_of(spike)) == {"deletion_spike"} and len({e.id for e in spike}) == 1
    audit = {"ts_ms": T0, "branch": "0101", "table": "public.customers", "op": "erase", "subject": "u1",
             "decision": "erase", "reason": "root_delete_unconfigured"}
    explained = {**audit, "reason": "erasure_scheduled", "subject": "u2"}
    assert [f.kind for f in from_audit(explained, "guard.audit:0:2")] == ["erasure"]
    emits = run(analyzer, from_audit(explained, "guard.audit:0:2") + from_audit(audit, "guard.audit:0:1"))
    assert rules_of(emits) == Counter({"unexplained_delete": 1})
    store = RedisKeyStore(stack["GUARD_REDIS_URL"], "demo-bank",
                          password_file=stack["GUARD_REDIS_PASSWORD_FILE"])
    held = f"held-{uuid.uuid4().hex[:8]}"
    store.set_hold("0101", held, True)
    try:
        emits = run(analyzer, [fact("delete", table="public.customers", subject=held),
                               fact("delete", table="public.customers", subject="not-held")])
    finally:
        store.set_hold("0101", held, False)
    assert rules_of(emits) == Counter({"delete_under_legal_hold": 1})
    assert emits[0].severity == "critical"


def test_drift_integrity_and_dlq_spike(analyzer: Analyzer) -> None:
    drift = {"type": "anomaly", "rule": "schema_drift_unclassified_column", "severity": "high", "branch": "0101",
             "table": "public.notes", "column": "phone2", "at_ms": T0}
    emits = run(analyzer, from_legacy_anomaly(drift, "guard.anomalies:0:5", T0) * 2)
    assert rules_of(emits) == Counter({"schema_drift": 1})
    dlq = [from_dlq({"reason": "bad_json", "branch": "0101", "at_ms": T0 + i}, f"guard.dlq:0:{i}", T0)[0]
           for i in range(8)]
    assert not run(analyzer, dlq), "8 DLQ records in 5 minutes are under the spike threshold"
    more = [from_dlq({"reason": "bad_json", "branch": "0101", "at_ms": T0 + 100 + i}, f"guard.dlq:0:{100 + i}",
                     T0)[0] for i in range(5)]
    assert set(rules_of(run(analyzer, more))) == {"dlq_spike"}
    bad = from_dlq({"reason": "integrity_check_failed", "branch": "0101", "at_ms": T0}, "guard.dlq:0:900", T0)
    assert rules_of(run(analyzer, bad)) == Counter({"integrity_failure": 1})


def test_former_owner_after_transfer_cutoff_is_critical(analyzer: Analyzer) -> None:
    cutoff = T0 + 3_600_000
    analyzer.process(Fact("principal", "reg:old", T0, "0101", principal="old-teller",
                          attrs={"state": "active", "owner": "bank-old"}))
    analyzer.process(Fact("principal", "reg:new", T0, "0101", principal="new-teller",
                          attrs={"state": "active", "owner": "bank-a"}))
    analyzer.process(Fact("transfer", "transfer:0101", T0, "0101",
                          attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": cutoff}))
    # before the cut-off the old owner's staff may work; after it the new owner's staff works normally
    before = [fact("access", ts=cutoff - 60_000, principal="old-teller", action="reveal", categories={"contact": 1})]
    after_new = [fact("access", ts=cutoff + 60_000, principal="new-teller", action="reveal",
                      categories={"contact": 1})]
    emits = run(analyzer, before + after_new)
    assert "access_after_transfer_cutoff" not in rules_of(emits)
    emits = run(analyzer, [fact("access", ts=cutoff + 120_000 + i, principal="old-teller", action="reveal",
                                categories={"contact": 1}) for i in range(3)])
    transfer = [e for e in emits if e.record["rule"] == "access_after_transfer_cutoff"]
    assert transfer and transfer[0].severity == "critical" and transfer[0].record["state"] == "open"
    assert len({e.id for e in transfer}) == 1


def test_sanitized_update_yields_a_contact_write_with_tokens_only() -> None:
    rec = {"op": "u", "table": "public.customers", "branch": "0101", "ts_ms": T0, "source_ts_ms": T0,
           "subject": "subj", "before": {"index": {"mobile": "old", "email": "e"}, "clear": {}},
           "after": {"index": {"mobile": "new", "email": "e"}, "clear": {"updated_by": "teller-1"}}}
    [f] = from_sanitized(rec, "sanitized.br0101.public.customers:0:7")
    assert (f.kind, f.columns, f.tokens, f.principal) == ("write", ["mobile"], {"mobile": "new"}, "Staff:teller-1")
    assert not from_sanitized({**rec, "after": rec["before"]}, "x:0:1"), "no contact column changed"


def test_alert_id_is_rule_scope_and_window() -> None:
    a = alert_id("bulk_access", "0101", "principal=p|category=account", 0)
    assert a == alert_id("bulk_access", "0101", "principal=p|category=account", 0)
    assert a != alert_id("bulk_access", "0101", "principal=p|category=account", 86_400_000)
    assert len(a) == 32


def test_flush_resolves_ended_windows(analyzer: Analyzer) -> None:
    emits = run(analyzer, [fact("access", ts=T0 + i, principal="teller-1", action="export", count=30,
                                categories={"account": 30}) for i in range(2)])
    aid = emits[0].id
    clock_later = Analyzer(analyzer.state, analyzer.rules, clock=lambda: T0 / 1000 + 3 * 86_400)
    resolved = [e for e in clock_later.flush() if e.id == aid]
    assert resolved and resolved[0].record["state"] == "resolved"
    assert aid not in analyzer.state.open_alert_ids()


def test_rules_file_overrides_per_branch(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(default_rules_path().read_text() + '\n[branches."0202"]\ntimezone = "Asia/Urumqi"\n'
                    '[branches."0202".bulk_access]\nthresholds = { account = 5 }\n')
    cfg = RuleConfig.load(path)
    assert cfg.rule("0202", "bulk_access")["thresholds"]["account"] == 5
    assert cfg.rule("0202", "bulk_access")["thresholds"]["transaction"] == 250, "merged key by key"
    assert cfg.rule("0101", "bulk_access")["thresholds"]["account"] == 25
    assert cfg.for_branch("0202")["timezone"] == "Asia/Urumqi"


def test_state_keys_carry_the_tenant_prefix(analyzer: Analyzer, stack: dict[str, str]) -> None:
    run(analyzer, normal_reveals(3))
    client = redis_client(stack["GUARD_REDIS_URL"], stack["GUARD_REDIS_PASSWORD_FILE"])
    keys = [k.decode() for k in client.scan_iter(match=f"*{analyzer.state.tenant}*")]
    assert keys and all(k.startswith(f"bg:{analyzer.state.tenant}:anomaly:") for k in keys)


def test_a_batch_counts_like_one_fact_at_a_time(analyzer: Analyzer) -> None:
    """process_batch (the agent's path: one pipeline per batch) gives the counts and alerts of process."""
    exports = [fact("access", ts=T0 + i, principal="teller-1", action="export", count=3, categories={"account": 3})
               for i in range(20)]
    emits = analyzer.process_batch(exports[:10]) + analyzer.process_batch(exports[10:] + exports[:5])  # a replay
    for e in emits:
        analyzer.emitted(e)
    assert {e.record["rule"] for e in emits} == {"bulk_access"}
    assert len({e.id for e in emits}) == 1
    assert analyzer.state.alert_state(emits[0].id)["count"] == 60  # type: ignore[index]


def test_sanitizer_anomalies_are_reissued_once_per_rule_table_and_day(analyzer: Analyzer) -> None:
    """The policy engine's write_denied anomalies (issue 14) of one table: one alert, counted, not one each."""
    docs = [{"type": "anomaly", "rule": "write_denied", "severity": "high", "branch": "0101",
             "table": "public.customers", "column": None, "at_ms": T0 + i, "principal": "t0101-09",
             "what": "a change was written by a principal the access policy does not allow to",
             "suggested_action": "check who made the change"} for i in range(4)]
    facts = [f for i, d in enumerate(docs) for f in from_legacy_anomaly(d, f"guard.anomalies:0:{i}", T0)]
    emits = run(analyzer, facts)
    assert {e.record["rule"] for e in emits} == {"write_denied"} and len({e.id for e in emits}) == 1
    assert analyzer.state.alert_state(emits[0].id)["count"] == 4  # type: ignore[index]


def test_transfer_owner_from_the_cutoff(analyzer: Analyzer) -> None:
    """The policy's Branch entity names the owner from the cut-off on (to_owner): anyone else is critical."""
    cutoff = T0 + 60_000
    analyzer.process(Fact("principal", "r:b", T0, "0101", principal="Staff:b-1", attrs={"owner": "bank-b"}))
    analyzer.process(Fact("principal", "r:a", T0, "0101", principal="Staff:a-1", attrs={"owner": "bank-a"}))
    analyzer.process(Fact("transfer", "tr", T0, "0101", attrs={"to_owner": "bank-b", "cutoff_ms": cutoff}))
    ok = run(analyzer, [fact("write", ts=cutoff + 1000, principal="Staff:b-1", action="write"),
                        fact("write", ts=cutoff - 1000, principal="Staff:a-1", action="write")])
    assert not [e for e in ok if e.record["rule"] == "access_after_transfer_cutoff"]
    bad = run(analyzer, [fact("write", ts=cutoff + 2000, principal="Staff:a-1", action="delete")])
    assert [e.record["rule"] for e in bad if e.severity == "critical"] == ["access_after_transfer_cutoff"]


def test_a_denial_by_the_cutoff_policy_is_a_transfer_alert(analyzer: Analyzer) -> None:
    """Issue 14's write decision denied by `nobody-outside-owner-after-cutoff`: critical, no registry needed."""
    detail = {"decision": "write_denied", "principal": "Staff:x-9", "action": "write",
              "policies": ["nobody-outside-owner-after-cutoff"], "reason": "forbidden", "errors": []}
    rec = {"ts_ms": T0, "branch": "0101", "table": "public.customers", "op": "u", "subject": None,
           "decision": "write_denied", "reason": orjson.dumps(detail).decode()}
    other = {**rec, "reason": orjson.dumps({**detail, "principal": "Staff:teller-1", "policies": []}).decode()}
    emits = run(analyzer, from_audit(rec, "guard.audit:0:50") + from_audit(other, "guard.audit:0:51"))
    transfer = [e for e in emits if e.record["rule"] == "access_after_transfer_cutoff"]
    assert len(transfer) == 1 and transfer[0].record["principal"] == "Staff:x-9"


def test_takeover_pairs_a_change_and_a_transaction_read_out_of_order(analyzer: Analyzer) -> None:
    """A change at 10:00, a large transaction at 11:00, a revert at 12:00: read in order, or the transaction
    after both changes (a backlog, a restart), one takeover alert, for the 10:00 change."""
    def day(subject: str) -> tuple[Fact, Fact, Fact]:
        change = fact("write", ts=T0, principal="teller-2", subject=subject, columns=["mobile"],
                      tokens={"mobile": f"{subject}-new"})
        txn = fact("transaction", ts=T0 + 3_600_000, subject=subject, attrs={"amount_band": "large"})
        revert = fact("write", ts=T0 + 7_200_000, principal="teller-2", subject=subject, columns=["mobile"],
                      tokens={"mobile": f"{subject}-old"})
        return change, txn, revert

    for subject, order in (("late-txn", (0, 2, 1)), ("in-order", (0, 1, 2))):
        facts = day(subject)
        emits = [e for e in run(analyzer, [facts[i] for i in order])
                 if e.record["rule"] == "contact_change_then_large_transaction"]
        assert len(emits) == 1, subject
        assert emits[0].record["window_start_ms"] == T0 and emits[0].record["last_seen_ms"] == T0 + 3_600_000
        assert not run(analyzer, list(facts)), "a replay raises nothing new"


def test_an_alert_without_window_end_keeps_its_version_for_good(analyzer: Analyzer) -> None:
    """A transfer alert's id never changes: its state must not expire (a repeat after 30 quiet days would
    restart at version 1, a key the webhook's receiver already saw); windowed alerts still expire."""
    cutoff = T0 + 3_600_000
    analyzer.process(Fact("principal", "reg:old", T0, "0101", principal="old-teller",
                          attrs={"state": "active", "owner": "bank-old"}))
    analyzer.process(Fact("transfer", "transfer:0101", T0, "0101",
                          attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": cutoff}))
    def transfer_alerts(ts: int) -> list[Emit]:
        return [e for e in run(analyzer, [fact("access", ts=ts, principal="old-teller", action="reveal",
                                               categories={"contact": 1})])
                if e.record["rule"] == "access_after_transfer_cutoff"]

    [first] = transfer_alerts(cutoff + 1)
    client = analyzer.state.client
    assert client.ttl(analyzer.state.key("alert", first.id)) == -1, "the alert's state must not expire"
    assert client.ttl(analyzer.state.key("evidence", first.id)) == -1
    later = transfer_alerts(cutoff + 31 * 86_400_000)
    assert [e.id for e in later] == [first.id] and later[0].version > first.version
    bulk = run(analyzer, [fact("access", ts=T0, principal="teller-1", action="export", count=30,
                               categories={"account": 30})])
    assert 0 < client.ttl(analyzer.state.key("alert", bulk[0].id)) <= 30 * 86_400, "windowed alerts expire"
