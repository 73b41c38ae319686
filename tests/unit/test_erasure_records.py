"""Erasure's pure logic: confirmation outcomes and what they say remains, DLQ records of erased subjects,
which pending confirmations a worker may deliver, and the invalidation listener's parsing (issue 13,
findings 2, 4, 8, 9). The key store behaviour is tested on the real Redis (tests/integration)."""

from __future__ import annotations

import orjson

from guard.config import Settings
from guard.kafka.confirmations import TAKEOVER_MARGIN_MS, due
from guard.keys.primitives import Aead, BlindIndex, Hmac
from guard.pipeline.erasure_records import pending_entry, pending_records
from guard.records.builders import OutRecord, RecordBuilder


class _Keys:
    """The key manager's attributes the record builder reads (pure: no key store)."""

    tenant = "t"
    index = BlindIndex(b"i" * 32)
    quarantine = Aead(b"q" * 32, version=1)
    dlq_hash = Hmac(b"h" * 32)


def _builder() -> RecordBuilder:
    return RecordBuilder(Settings(worker_id="w1"), _Keys(), clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]


def _confirmation(outcome: str, destroyed: int, held: bool = False) -> tuple[dict, OutRecord]:
    records = _builder().deletion("s" * 32, confirmation_id="c1", outcome=outcome, held=held, destroyed=destroyed,
                                  known_topics=["sanitized.br0101.public.customers"], trigger="erase_command",
                                  reason_code="subject_request", reason="r", by="dpo", source=None, now_ms=5)
    return orjson.loads(records[0].value or b""), records[1]


def test_a_subject_without_keys_is_reported_no_keys_not_shredded():
    doc, audit = _confirmation("no_keys", 0)
    assert doc["outcome"] == "no_keys" and doc["keys_destroyed"] == []
    assert doc["unreadable_topics"] == [] and "never held a key" in doc["method"]
    assert doc["audit"]["decision"] == "no_keys"


def test_a_confirmation_lists_every_place_data_can_remain():
    doc, _ = _confirmation("shredded", 2)
    assert doc["keys_destroyed"] == [f"dek/0101/{'s' * 32}/v1", f"dek/0101/{'s' * 32}/v2"]
    places = {r["where"] for r in doc["remains"]}
    assert {"sanitized.br0101.public.customers", "guard.audit", "guard.dlq", "br0101.* (raw CDC topics)",
            "key store append-only file", "key store backups and RDB snapshots", "running workers' caches",
            "the branch database"} <= places
    assert all(r["what"] and r["until"] for r in doc["remains"])


def test_confirmation_records_carry_the_confirmation_time_as_timestamp():
    builder = _builder()
    records = builder.deletion("s" * 32, confirmation_id="c1", outcome="shredded", held=False, destroyed=1,
                               known_topics=[], trigger="t", reason_code="x", reason="r", by="b", source=None,
                               now_ms=12345)
    assert [r.timestamp for r in records] == [12345, 12345]


def test_a_write_for_an_erased_subject_is_not_copied_into_the_dlq():
    value = b'{"payload": {"after": {"name": "\\u5f20\\u4e09", "mobile": "13800138000"}}}'
    records = _builder().dlq("br0101.public.customers", 0, 7, b'{"customer_id": 1}', value, "subject_erased", "d")
    doc = orjson.loads(records[0].value or b"")
    assert doc["quarantine"]["value"] is None and doc["quarantine"]["key"] is None
    assert "erased" in doc["quarantine"]["note"]
    assert doc["source"] == {"topic": "br0101.public.customers", "partition": 0, "offset": 7}
    assert "value_sha256" not in doc
    # keyed: the guard's HMAC, not a hash anyone could confirm a guessed input against
    assert doc["value_hmac"] == Hmac(b"h" * 32).hexdigest("bg-dlq-value", value)
    assert doc["value_hmac"] != Hmac(b"x" * 32).hexdigest("bg-dlq-value", value)
    import hashlib
    assert hashlib.sha256(value).hexdigest() not in records[0].value.decode()  # type: ignore[union-attr]


def test_other_dlq_inputs_are_still_kept_sealed():
    records = _builder().dlq("br0101.public.customers", 0, 7, b"k", b"not json", "invalid_json", "d")
    doc = orjson.loads(records[0].value or b"")
    assert doc["quarantine"]["value"] and doc["quarantine"]["key"]


def test_a_pending_entry_gives_back_the_same_records():
    records = [OutRecord("guard.deletions", b"s", b'{"id": "c1"}', timestamp=99),
               OutRecord("guard.audit", b"k", b"\x00a")]
    entry = orjson.loads(pending_entry("c1", 99, "txn#1", ("t", 0, 5), records, 100))
    back = pending_records(entry)
    assert [(r.topic, r.key, r.value, r.timestamp) for r in back] == [
        ("guard.deletions", b"s", b'{"id": "c1"}', 99), ("guard.audit", b"k", b"\x00a", 99)]
    assert entry["source"] == ["t", 0, 5]


def _entry(owner: str, claimed_ms: int) -> bytes:
    return orjson.dumps({"id": f"id-{owner}-{claimed_ms}", "at_ms": claimed_ms, "claimed_ms": claimed_ms,
                         "owner": owner, "records": []})


def test_pending_confirmations_due_are_the_fenced_predecessors_and_the_stale_ones():
    now, timeout = 1_000_000, 30_000
    entries = {
        "mine-now": _entry("grp-w1#new", now),            # carried by this incarnation's own transaction
        "predecessor": _entry("grp-w1#old", now),          # fenced by this incarnation's init_transactions
        "other-live": _entry("grp-w2#x", now - 1000),      # another worker's open transaction may carry it
        "other-stale": _entry("grp-w2#x", now - timeout - TAKEOVER_MARGIN_MS - 1),
        "carried": _entry("grp-w1#old", now),
        "garbage": b"\xff",
    }
    picked = due(entries, owner="grp-w1#new", carried={"carried"}, now_ms=now, transaction_timeout_ms=timeout)
    assert set(picked) == {"predecessor", "other-stale"}


class _TenantKeysOnly:
    """Just enough of a key store to construct a KeyManager without Redis (pure logic below)."""

    def __init__(self) -> None:
        self.wrapped: dict[str, bytes] = {}

    def tenant_keys(self, wrapped_if_absent: dict[str, bytes]) -> dict[str, bytes]:
        return {p: self.wrapped.setdefault(p, w) for p, w in wrapped_if_absent.items()}

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        return [p for p in purposes if p not in self.wrapped]


def _manager():
    from guard.keys.kms import LocalKeyring
    from guard.keys.manager import KeyManager

    return KeyManager(LocalKeyring(b"m" * 32), _TenantKeysOnly(), "t", listen=False)  # type: ignore[arg-type]


def test_the_invalidation_listener_survives_malformed_messages_and_drops_every_key():
    import time as _time

    keys = _manager()
    aead = Aead(b"d" * 32, version=1)
    keys._remember("0101", "s1", aead, _time.monotonic(), keys._invalidations)
    keys._remember("0101", "s2", aead, _time.monotonic(), keys._invalidations)
    keys._on_invalidation(b"\xff\xfe not utf-8")  # must not raise (it killed the listener thread before)
    assert keys.cached_subject_aead("0101", "s1") is None and keys.cached_subject_aead("0101", "s2") is None
    keys._remember("0101", "s1", aead, _time.monotonic(), keys._invalidations)
    keys._on_invalidation(b"0101:s1:7")
    assert keys.cached_subject_aead("0101", "s1") is None and keys._applied_epoch == 7


def test_a_key_fetched_across_an_invalidation_is_not_cached():
    """The listener can forget a key before the worker remembers it: such a key must not be cached."""
    import time as _time

    keys = _manager()
    seen = keys._invalidations           # the fetch starts
    keys._on_invalidation(b"0101:s1:3")  # the shred's invalidation is applied while the fetch is in flight
    keys._remember("0101", "s1", Aead(b"d" * 32, version=1), _time.monotonic(), seen)
    assert keys.cached_subject_aead("0101", "s1") is None


def test_an_invalidation_during_a_batch_fetch_refuses_only_the_key_it_names():
    """A shred elsewhere must not cost the rest of the batch a round trip per record: the other keys of
    the same fetch are cached; a dropped cache (reconnect, garbage) refuses them all."""
    import time as _time

    keys = _manager()
    aead = Aead(b"d" * 32, version=1)
    seen = keys._invalidations
    keys._on_invalidation(b"0101:s1:3")
    keys._on_invalidation(b"0202:s2:4")  # another branch's subject s2: not this branch's s2
    keys._remember_many("0101", [("s1", aead), ("s2", aead), ("s3", aead)], _time.monotonic(), seen)
    assert keys.cached_subject_aead("0101", "s1") is None
    assert keys.cached_subject_aead("0101", "s2").cache_entry() is aead.cache_entry()
    assert keys.cached_subject_aead("0101", "s3").cache_entry() is aead.cache_entry()

    seen = keys._invalidations
    keys._drop_all()
    keys._remember_many("0101", [("s4", aead)], _time.monotonic(), seen)
    keys._remember("0101", "s5", aead, _time.monotonic(), seen)
    assert keys.cached_subject_aead("0101", "s4") is None and keys.cached_subject_aead("0101", "s5") is None


def test_more_invalidations_than_remembered_refuse_every_key():
    import time as _time

    keys = _manager()
    seen = keys._invalidations - keys._invalidated.maxlen - 1  # as if that many arrived during the fetch
    keys._remember_many("0101", [("s1", Aead(b"d" * 32, version=1))], _time.monotonic(), seen)
    assert keys.cached_subject_aead("0101", "s1") is None


def _truncate(table: str) -> bytes:
    return orjson.dumps({"op": "t", "before": None, "after": None, "ts_ms": 1,
                         "source": {"db": "branch_0101", "schema": "public", "table": table, "lsn": 10, "ts_ms": 1}})


def test_truncating_a_root_table_erases_nobody_and_raises_an_alert_naming_it():
    from guard.classify.catalog import Catalog
    from guard.pipeline.sanitizer import Sanitizer

    sanitizer = Sanitizer(Settings(worker_id="w1", hot_path="python"), _manager(), Catalog.load(None))
    out = sanitizer.process("br0101.public.customers", 0, 3, None, _truncate("customers"))
    assert out.decision == "truncate"
    topics = [r.topic for r in out.records]
    assert "guard.deletions" not in topics
    alerts = [orjson.loads(r.value or b"") for r in out.records if r.topic == "guard.anomalies"]
    assert [(a["rule"], a["table"], a["severity"]) for a in alerts] == [
        ("root_table_truncated", "public.customers", "high")]
    other = sanitizer.process("br0101.public.accounts", 0, 4, None, _truncate("accounts"))
    assert other.decision == "truncate" and not [r for r in other.records if r.topic == "guard.anomalies"]
