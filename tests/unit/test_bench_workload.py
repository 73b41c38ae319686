"""The bench's realistic workload (pure generation, no Kafka): its tables, skew, mix and replay."""

from collections import Counter

import orjson
import pytest

from guard.bench.common import BenchError
from guard.bench.workload import (
    BENCH_DELETER,
    BENCH_PRINCIPAL,
    MESSAGE_KEY,
    MESSAGE_TOPIC,
    TABLES,
    BranchDay,
    ZipfRanks,
    build_workload,
)
from guard.cdc.envelope import decode_value
from guard.config import load_settings
from guard.pipeline.policy import WriteChecker
from guard.policy.engine import PolicyEngine, default_directory
from guard.policy.sources import staff_entities
from guard.workload.synth import DEMO_STAFF
from tests.unit.test_write_checker import Attributions  # the key store's attribution sets, in memory


def test_zipf_ranks_stay_in_the_population_and_favour_low_ranks() -> None:
    ranks = ZipfRanks(1_000_000, 0.8)
    assert ranks.draw(0.0) == 1 and ranks.draw(0.999999999) <= 1_000_000
    draws = [ranks.draw(u / 10_000) for u in range(10_000)]
    assert all(1 <= r <= 1_000_000 for r in draws)
    # P(k) ~ k^-0.8: the first 1% of ranks get far more than 1% of draws, and half of the draws fall
    # beyond the first 5% (a long tail, most customers drawn rarely).
    assert sum(r <= 10_000 for r in draws) / len(draws) > 0.25
    assert sum(r > 50_000 for r in draws) / len(draws) > 0.4
    with pytest.raises(BenchError):
        ZipfRanks(10, 1.0)


def test_realistic_events_cover_every_table_and_a_branch_days_ops() -> None:
    workload = build_workload(6000, customers=50_000, seed=3)
    assert len(workload.order) == 6000 and workload.kind == "realistic"
    assert workload.tables and set(workload.tables) == set(TABLES)
    counts = workload.facts["events"]
    assert sum(sum(ops.values()) for ops in counts.values()) == 6000
    assert counts["public.transactions"]["c"] > counts["public.customers"].get("u", 0) > 0
    assert counts["public.customers"]["c"] > 0 and counts["public.customers"]["d"] > 0
    assert counts["public.customers"]["tombstone"] == counts["public.customers"]["d"]
    assert workload.facts["distinct_customers"] > 1000


def test_events_are_debezium_envelopes_with_the_c3_columns_as_the_connector_sends_them() -> None:
    workload = build_workload(3000, customers=10_000, seed=5)
    for n, (table, key, prefix) in enumerate(workload.templates):
        value = workload.value(n, 1234567890123)
        if prefix is None:
            assert value is None  # a tombstone follows every delete
            continue
        if table == MESSAGE_TOPIC:
            continue  # a delete's attribution (test_every_event_names_its_principal_...)
        event = orjson.loads(value)
        assert event["ts_ms"] == 1234567890123 and event["source"]["table"] == table.split(".")[1]
        row = event["after"] or event["before"]
        assert str(row["customer_id"]) in key.decode() or table in ("public.accounts", "public.transactions")
        if table == "public.customer_auth":
            assert "query_pin" not in row  # excluded at the source
            assert len(row["password_hash"]) == 64 and int(row["password_hash"], 16) >= 0  # the salted digest


def test_no_event_of_a_customer_after_it_left_and_replays_skip_leaving_customers() -> None:
    day = BranchDay(5000, seed=11)
    workload = day.build(8000)
    left_at: dict[int, int] = {}
    for n, (table, _, prefix) in enumerate(workload.templates):
        if table == "public.customers" and prefix is not None and b'"op":"d"' in prefix:
            left_at[day.owner[n]] = n
    assert left_at
    for n, owner in enumerate(day.owner):
        if owner in left_at:
            # the delete's tombstone and its statement's attribution message are the customer's last events
            assert n <= left_at[owner] + 2
    assert all(day.owner[i] not in left_at for i in workload.replay)
    assert len(workload.replay) == workload.facts["replayed_events"] < len(workload.order)


def test_the_same_seed_gives_the_same_rows_and_keys() -> None:
    """Reproducible up to the timestamps (the day is today): same rows, keys and customers."""
    first, second = build_workload(2000, customers=1000, seed=9), build_workload(2000, customers=1000, seed=9)
    assert [(t, k) for t, k, _ in first.templates] == [(t, k) for t, k, _ in second.templates]
    assert Counter(t for t, _, _ in first.templates) == Counter(t for t, _, _ in second.templates)
    assert first.facts == second.facts


def test_hot_is_customers_only_creates_and_updates() -> None:
    workload = build_workload(5000, kind="hot")
    assert workload.tables == ["public.customers"] and workload.customers == 4000
    assert set(workload.facts["events"]["public.customers"]) == {"c", "u"}
    with pytest.raises(BenchError, match="unknown workload"):
        build_workload(10, kind="cold")


# --- attribution (issue 14's policy checks): every write names its principal -----------------------------
def _demo_checker() -> tuple[WriteChecker, Attributions]:
    """The guard's write checker on the demo policy and the demo branch's staff, as a bench guard has it
    (policy branch 0101), with the key store's attribution sets in memory."""
    settings = load_settings(None, branch="bench", policy_branch="0101", policy_staff="file", attribution_wait_s=0)
    staff = staff_entities([(s, b, o, a, list(r)) for s, _, b, o, a, r in DEMO_STAFF])
    store = Attributions()
    return WriteChecker(settings, PolicyEngine(default_directory(), entity_source=lambda: staff),
                        store), store  # type: ignore[arg-type]


def test_every_event_names_its_principal_and_every_delete_has_its_message() -> None:
    """What a bench guard decides on the realistic workload: every create and update carries `updated_by`
    (read as the native path's scan reads it, and decoded), every delete is joined with the message of its
    transaction on `<prefix>.message`, and the demo policy allows them all: none `unattributed`."""
    workload = build_workload(20_000, customers=5000, seed=3)
    assert workload.has_messages and workload.topics == [*workload.tables, MESSAGE_TOPIC]
    checker, store = _demo_checker()
    events = {n: decode_value(workload.value(n, 1_800_000_000_000)) for n in workload.order
              if workload.templates[n][2] is not None}
    messages = {n: e for n, e in events.items() if e is not None and e.op == "m"}
    assert len(messages) == workload.facts["events"][MESSAGE_TOPIC]["m"]
    for n, message in messages.items():
        assert workload.templates[n][:2] == (MESSAGE_TOPIC, MESSAGE_KEY) and message.tx_id is not None
        assert checker.record_message(message) == BENCH_DELETER
    decisions: Counter[str] = Counter()
    deletes = 0
    for n, event in events.items():
        assert event is not None
        table = workload.templates[n][0]
        if event.op == "m":
            continue
        assert table in TABLES and event.schema_table == table
        if event.op == "d":
            deletes += 1
            # its message follows its statement's rows (the AFTER DELETE statement trigger), same txId
            tx_id = event.tx_id
            assert tx_id is not None and store.sets[tx_id] == {BENCH_DELETER}
            assert any(m > n and messages[m].tx_id == tx_id for m in messages if m - n <= 8)
        else:
            assert (event.after or {})["updated_by"] == BENCH_PRINCIPAL
            scanned = checker.scan(workload.value(n, 1_800_000_000_000) or b"", table)
            assert scanned is not None and scanned[1].principal == BENCH_PRINCIPAL
        decision = checker.decide_event(event, (table, 0, n))
        assert decision is not None
        decisions[decision.decision] += 1
    assert deletes == sum(ops.get("d", 0) for ops in workload.facts["events"].values()) > 0
    assert decisions == {"allow": len(events) - len(messages)}, decisions


def test_a_cut_workload_never_ends_between_a_delete_and_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last change may be cut at `records`, but never a customer leaving (its deletes would wait for
    their attribution in vain)."""
    monkeypatch.setattr("guard.bench.workload.MIX", (("contact_update", 0.5), ("customer_leaves", 0.5)))
    with_deletes = 0
    for records in range(20, 60):
        workload = BranchDay(500, seed=records).build(records)
        assert len(workload.order) == records
        events = [e for n in workload.order if (v := workload.value(n, 1)) and (e := decode_value(v)) is not None]
        deleted = {e.tx_id for e in events if e.op == "d"}
        assert deleted <= {e.tx_id for e in events if e.op == "m"}
        with_deletes += bool(deleted)
    assert with_deletes > 30  # most sizes have customers leaving: the check above is not vacuous


def test_the_hot_workload_names_its_principal_too() -> None:
    workload = build_workload(500, kind="hot")
    assert not workload.has_messages and workload.topics == ["public.customers"]
    for n in set(workload.order):
        event = decode_value(workload.value(n, 1))
        assert event is not None and (event.after or {})["updated_by"] == BENCH_PRINCIPAL
