"""Erasure triggers are explicit per table (issue 13, finding 3): what a root delete means comes from the
catalog (with its reason code, never an invented one), a grace period lets a re-insert cancel a pending
shred, and retention runs from the end of the relationship as the data says it. Key-store effects of the
same rules run on the real Redis in tests/integration/test_erasure.py."""

from __future__ import annotations

import orjson
import pytest

from guard.classify.catalog import Catalog, CatalogError
from guard.config import Settings
from guard.pipeline.sanitizer import Sanitizer
from guard.pipeline.values import relationship_end_s

_BASE = """
version = 1
[tables."public.customers"]
subject_column = "customer_id"
subject_root = true
retention_days = 10
{extra}
[tables."public.customers".columns]
customer_id = {{ class = "C1", category = "identifier", action = "clear" }}
name        = {{ class = "C2", category = "identity", action = "encrypt" }}
closed_at   = {{ class = "C1", category = "account", action = "clear" }}
"""


def _catalog(extra: str) -> Catalog:
    return Catalog.from_toml(_BASE.format(extra=extra), source="cat.toml")


@pytest.mark.parametrize(("extra", "fragment"), [
    ('on_delete = { meaning = "erasure" }', "needs a reason_code"),
    ('on_delete = { meaning = "erasure", reason_code = "because" }', "needs a reason_code"),
    ('on_delete = { meaning = "purge" }', "meaning must be one of"),
    ('on_delete = { meaning = "none", reason_code = "subject_request" }', "only for meaning"),
    ('on_delete = { meaning = "relationship_end", grace_s = 5 }', "grace_s is only for"),
    ('on_delete = { meaning = "erasure", reason_code = "subject_request", grace_s = -1 }', "non-negative"),
    ('relationship_end_column = "absent"', "not one of its columns"),
])
def test_on_delete_rules_are_enforced_at_load(extra: str, fragment: str) -> None:
    with pytest.raises(CatalogError, match=fragment):
        _catalog(extra)


def test_on_delete_only_on_root_tables() -> None:
    text = _BASE.format(extra="").replace("subject_root = true", "").replace(
        "retention_days = 10", 'retention_days = 10\non_delete = { meaning = "none" }')
    with pytest.raises(CatalogError, match="root tables"):
        Catalog.from_toml(text, source="cat.toml")


def test_the_shipped_catalog_says_what_a_customer_delete_means() -> None:
    od = Catalog.load(None).table("public.customers").on_delete  # type: ignore[union-attr]
    assert od is not None and od.meaning == "erasure" and od.reason_code == "art47_1_purpose_achieved"
    assert od.grace_s > 0


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (True, None), ("not a date", None), ("x" * 100, None),
    ("2026-01-02T00:00:00Z", 1767312000.0), ("2026-01-02T08:00:00+08:00", 1767312000.0),
    (20455, 20455 * 86_400.0),                    # Debezium DATE: days since the epoch
    (1767312000000, 1767312000.0),                # milliseconds
    (1767312000000000, 1767312000.0),             # microseconds (MicroTimestamp)
])
def test_relationship_end_values(value: object, expected: float | None) -> None:
    assert relationship_end_s(value) == expected


class _Store:
    """The key store calls a root delete makes without shredding (pure logic: no Redis)."""

    def __init__(self) -> None:
        self.wrapped: dict[str, bytes] = {}

    def tenant_keys(self, wrapped_if_absent: dict[str, bytes]) -> dict[str, bytes]:
        return {p: self.wrapped.setdefault(p, w) for p, w in wrapped_if_absent.items()}

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        return [p for p in purposes if p not in self.wrapped]


def _sanitizer(extra: str) -> tuple[Sanitizer, _Store]:
    from guard.keys.kms import LocalKeyring
    from guard.keys.manager import KeyManager
    from guard.keys.primitives import Aead

    store = _Store()
    keys = KeyManager(LocalKeyring(b"m" * 32), store, "t", listen=False)  # type: ignore[arg-type]
    aead = Aead(b"d" * 32, version=1)
    keys.subject_aead = lambda branch, subject: aead  # type: ignore[method-assign]
    return Sanitizer(Settings(worker_id="w1", hot_path="python"), keys, _catalog(extra), clock=lambda: 1000.0), store


def _event(op: str, closed_at: object = None) -> bytes:
    row = {"customer_id": 7, "name": "x", "closed_at": closed_at}
    return orjson.dumps({"op": op, "before": row if op == "d" else None, "after": None if op == "d" else row,
                         "ts_ms": 1, "source": {"db": "b", "schema": "public", "table": "customers", "lsn": 1,
                                                "ts_ms": 900_000}})


def _decisions(out) -> list[str]:
    from guard.records.codec import decode

    return [decode(r.value)["decision"] for r in out.records if r.topic == "guard.audit"]


def test_an_unconfigured_root_delete_is_audited_and_erases_nobody() -> None:
    sanitizer, store = _sanitizer("")
    out = sanitizer.process("br0101.public.customers", 0, 1, b'{"customer_id": 7}', _event("d"))
    assert "root_delete_unconfigured" in _decisions(out)
    assert not [r for r in out.records if r.topic == "guard.deletions"] and not sanitizer.take_erasure_schedules()
    assert [orjson.loads(r.value or b"")["rule"] for r in out.records if r.topic == "guard.anomalies"] == [
        "root_delete_unconfigured"]


def test_a_delete_meaning_none_does_nothing_to_the_subject() -> None:
    sanitizer, store = _sanitizer('on_delete = { meaning = "none" }')
    out = sanitizer.process("br0101.public.customers", 0, 1, b'{"customer_id": 7}', _event("d"))
    assert _decisions(out) == ["protected"] and not sanitizer.take_erasure_schedules()


def test_an_erasure_with_a_grace_period_is_scheduled_with_the_configured_reason() -> None:
    sanitizer, _ = _sanitizer('on_delete = { meaning = "erasure", reason_code = "subject_request", grace_s = 60 }')
    out = sanitizer.process("br0101.public.customers", 0, 1, b'{"customer_id": 7}', _event("d"))
    assert "erasure_scheduled" in _decisions(out)
    assert not [r for r in out.records if r.topic == "guard.deletions"]
    # a second delete in the batch keeps the first schedule (an earlier schedule stands)
    sanitizer._clock = lambda: 1005.0  # type: ignore[method-assign]
    sanitizer.process("br0101.public.customers", 0, 2, b'{"customer_id": 7}', _event("d"))
    (subject, (due, info)), = sanitizer.erasure_schedules.items()
    scheduled = orjson.loads(info)
    assert due == 1060.0 and scheduled["reason_code"] == "subject_request" and scheduled["source"][2] == 1
    # a re-insert of the row in the same batch reads as the root row being back (the runner writes the
    # schedules before it applies `root_changes`, which cancels this one)
    sanitizer.process("br0101.public.customers", 0, 3, b'{"customer_id": 7}', _event("c"))
    assert sanitizer.root_changes() == [subject]
    assert sanitizer.take_erasure_schedules() == {subject: (due, info)} and sanitizer.erasure_schedules == {}


def test_a_relationship_end_delete_starts_the_retention_and_a_reinsert_stops_it() -> None:
    sanitizer, _ = _sanitizer('on_delete = { meaning = "relationship_end" }')
    sanitizer.process("br0101.public.customers", 0, 1, b'{"customer_id": 7}', _event("d"))
    assert sanitizer.root_changes() == []
    expiries = sanitizer.take_expiries(sanitizer.root_changes())
    assert list(expiries.values()) == [900.0 + 10 * 86_400]
    sanitizer.process("br0101.public.customers", 0, 2, b'{"customer_id": 7}', _event("d"))
    sanitizer.process("br0101.public.customers", 0, 3, b'{"customer_id": 7}', _event("c"))
    assert sanitizer.take_expiries(sanitizer.root_changes()) == {}


def test_retention_runs_from_the_relationship_end_column_and_not_from_the_last_change() -> None:
    sanitizer, _ = _sanitizer('relationship_end_column = "closed_at"')
    sanitizer.process("br0101.public.customers", 0, 1, b'{"customer_id": 7}', _event("c"))
    assert list(sanitizer.take_expiries([]).values()) == [None]  # ongoing: no expiry at all
    sanitizer.process("br0101.public.customers", 0, 2, b'{"customer_id": 7}', _event("u", "2026-01-02T00:00:00Z"))
    assert list(sanitizer.take_expiries([]).values()) == [1767312000.0 + 10 * 86_400]
    # ordinary activity never moves an expiry (it used to push it to last change + retention)
    assert all(v is None for v in sanitizer.pending_activity().values())
