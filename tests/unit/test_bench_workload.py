"""The bench's realistic workload (pure generation, no Kafka): its tables, skew, mix and replay."""

from collections import Counter

import orjson
import pytest

from guard.bench.common import BenchError
from guard.bench.workload import TABLES, BranchDay, ZipfRanks, build_workload


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
            assert n <= left_at[owner] + 1  # the delete's tombstone is the customer's last event
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
