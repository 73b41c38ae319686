"""The fact adapters (guard/anomaly/facts.py) and the alert's terminal line: no Kafka, no Redis."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from guard.anomaly.alerts import AlertCodec, alert_id, read_anomaly, render_line
from guard.anomaly.facts import (
    Fact,
    facts_from_policy_entities,
    facts_from_record,
    from_audit,
    from_legacy_anomaly,
    from_sanitized,
    principal_name,
)
from guard.records.codec import AvroCodec, write_decision_of, write_reason

ROLES = {"audit": "guard.audit", "dlq": "guard.dlq", "anomalies": "guard.anomalies", "deletions": "guard.deletions",
         "facts": "guard.facts"}
AUDIT = {"v": 1, "ts_ms": 1_000, "worker": "w", "branch": "0101", "source_topic": "br0101.public.customers",
         "source_partition": 0, "source_offset": 7, "table": "public.customers", "op": "u", "subject": None,
         "decision": "protected", "reason": None, "classes": {}, "actions": {}, "unclassified": [], "trace_id": None}


def test_principal_names_follow_the_attribution_contract() -> None:
    assert principal_name("Staff:t0101-01") == "Staff:t0101-01"
    assert principal_name("t0101-01") == "Staff:t0101-01"
    assert principal_name("Service:eod-batch") == "Service:eod-batch"
    assert principal_name("") is None and principal_name(None) is None


def test_policy_write_decisions_become_principal_facts() -> None:
    detail = {"decision": "write_denied", "principal": "t0101-09", "action": "write", "policies": ["p7"],
              "reason": "no policy permits", "errors": []}
    [denied] = from_audit({**AUDIT, "decision": "write_denied", "reason": orjson.dumps(detail).decode()},
                          "guard.audit:0:1")
    assert (denied.kind, denied.principal, denied.action, denied.policies) == ("denied", "Staff:t0101-09", "write",
                                                                               ["p7"])
    allowed = {**detail, "decision": "write_allowed", "action": "delete"}
    [w] = from_audit({**AUDIT, "op": "d", "decision": "write_allowed", "reason": orjson.dumps(allowed).decode()},
                     "guard.audit:0:2")
    assert (w.kind, w.action, w.principal) == ("write", "delete", "Staff:t0101-09")
    assert not from_audit({**AUDIT, "decision": "unattributed", "reason": "{}"}, "guard.audit:0:3")


def test_a_changes_own_record_carries_its_write_decision() -> None:
    """Audit format 2: one record per change, its write decision in `reason`; it yields the change's facts
    and the decision's (a delete counted once, the principal's write by its own id)."""
    detail = {"decision": "allow", "principal": "Staff:m0101-01", "action": "delete", "policies": ["p1"],
              "reason": "", "errors": []}
    rec = {**AUDIT, "v": 2, "op": "d", "subject": "s-7", "reason": write_reason(detail)}
    assert write_decision_of(rec) == ("write_allowed", detail)
    delete, write = from_audit(rec, "guard.audit:0:9")
    assert (delete.kind, delete.id, delete.subject, delete.principal) == ("delete", "guard.audit:0:9", "s-7", None)
    assert (write.kind, write.id, write.action, write.principal, write.policies) == (
        "write", "guard.audit:0:9:policy", "delete", "Staff:m0101-01", ["p1"])
    denied = {**detail, "decision": "deny", "action": "write", "policies": []}
    [fact] = from_audit({**rec, "op": "u", "reason": write_reason(denied)}, "guard.audit:0:10")
    assert (fact.kind, fact.decision, fact.subject) == ("denied", "deny", "s-7")
    unattributed = {**detail, "decision": "unattributed", "principal": None}
    assert not from_audit({**rec, "op": "u", "reason": write_reason(unattributed)}, "guard.audit:0:11")
    # a format-1 reader's view: a v1 record's JSON reason is never read as a decision it carries
    assert write_decision_of({**rec, "v": 1}) is None


def test_sanitizer_audit_records() -> None:
    assert not from_audit(AUDIT, "a:0:1"), "an ordinary protected update is no fact"
    [d] = from_audit({**AUDIT, "op": "d", "subject": "tok"}, "a:0:2")
    assert (d.kind, d.subject, d.decision) == ("delete", "tok", "protected")
    [u] = from_audit({**AUDIT, "op": "erase", "decision": "erase", "reason": "root_delete_unconfigured"}, "a:0:3")
    assert (u.kind, u.decision) == ("delete", "unexplained")
    [e] = from_audit({**AUDIT, "op": "erase", "decision": "erase", "reason": "erasure_scheduled"}, "a:0:4")
    assert e.kind == "erasure"
    rec = AvroCodec("audit_record").encode({**AUDIT, "op": "d", "subject": "tok"})
    [viaKafka] = facts_from_record("guard.audit", 0, 9, 0, rec, topics=ROLES)
    assert viaKafka.id == "guard.audit:0:9" and viaKafka.kind == "delete"


def test_legacy_anomalies_and_our_own_alerts() -> None:
    drift = {"type": "anomaly", "rule": "schema_drift_unclassified_column", "severity": "high", "branch": "0101",
             "table": "t", "column": "c", "at_ms": 5}
    assert from_legacy_anomaly(drift, "x:0:1", 0)[0].kind == "drift"
    [w] = from_legacy_anomaly({**drift, "rule": "write_denied", "column": None, "principal": "t1"}, "x:0:2", 0)
    assert (w.kind, w.reason, w.principal) == ("anomaly", "write_denied", "Staff:t1")
    codec = AlertCodec()
    static = {"id": "a" * 32, "rule": "r", "severity": "high", "branch": "0101", "principal": None, "scope": "s",
              "threshold": 1, "window_start_ms": 0, "window_end_ms": 1, "summary": "x", "suggested_action": "y"}
    value = codec.encode(codec.record(static, version=1, count=1, first_ms=0, last_ms=0, state="open", evidence=[]))
    assert not facts_from_record("guard.anomalies", 0, 1, 0, value, topics=ROLES), "alerts are not re-read"
    assert read_anomaly(value)["id"] == "a" * 32


def test_sanitized_staff_rows_feed_the_principal_registry() -> None:
    rec = {"op": "u", "table": "public.staff", "branch": "0101", "ts_ms": 9, "source_ts_ms": 8, "subject": None,
           "before": None, "after": {"clear": {"staff_id": "t0101-02", "organisation": "bank-a", "active": False},
                                     "index": {}}}
    [p] = from_sanitized(rec, "s:0:1")
    assert (p.kind, p.principal, p.attrs) == ("principal", "Staff:t0101-02", {"state": "disabled", "owner": "bank-a"})


def test_policy_entities_give_principals_and_transfers() -> None:
    entities = [
        {"uid": {"type": "BranchGuard::Branch", "id": "0102"}, "attrs": {
            "code": "0102", "owner": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-b"}},
            "transfer_state": "transferring", "cutoff": {"__extn": {"fn": "datetime", "arg": "2027-03-31T16:00:00Z"}}},
         "parents": []},
        {"uid": {"type": "BranchGuard::Branch", "id": "0101"}, "attrs": {"code": "0101", "transfer_state": "active"}},
        {"uid": {"type": "BranchGuard::Staff", "id": "t0102-01"}, "attrs": {
            "branch": {"__entity": {"type": "BranchGuard::Branch", "id": "0102"}},
            "organisation": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-a"}}, "active": True}},
        {"uid": {"type": "BranchGuard::Service", "id": "eod-batch"}, "attrs": {
            "organisation": {"__entity": {"type": "BranchGuard::Organisation", "id": "bank-a"}}}},
    ]
    facts = {f.principal or f.branch: f for f in facts_from_policy_entities(entities, 1)}
    assert facts["0102"].kind == "transfer" and facts["0102"].attrs["to_owner"] == "bank-b"
    assert facts["0102"].attrs["cutoff_ms"] == int(datetime(2027, 3, 31, 16, tzinfo=UTC).timestamp() * 1000)
    assert "0101" not in facts, "a branch without a cut-off is no transfer"
    assert facts["Staff:t0102-01"].attrs == {"state": "active", "owner": "bank-a"}
    assert facts["Service:eod-batch"].attrs["owner"] == "bank-a"


def test_fact_json_roundtrip_and_validation() -> None:
    f = Fact("access", "id1", 5, "0101", principal="Staff:t1", action="export", count=30, categories={"account": 30})
    assert Fact.from_mapping(orjson.loads(f.to_json())) == f
    for bad in ({"kind": "access"}, {"kind": "nope", "id": "1", "ts_ms": 1, "branch": "0101"}):
        try:
            Fact.from_mapping(bad)
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "DecodeError"
        else:
            raise AssertionError(f"{bad} accepted")


def test_render_line_is_one_readable_line_plus_the_action() -> None:
    alert = {"id": alert_id("bulk_access", "0101", "p", 0), "rule": "bulk_access", "severity": "high",
             "state": "updated", "branch": "0101", "principal": "Staff:t1", "count": 40, "threshold": 25,
             "summary": "40 account records", "suggested_action": "ask the manager", "last_seen_ms": 0}
    first, second = render_line(alert).split("\n")
    assert first.startswith("1970-01-01 00:00:00Z  HIGH") and "count=40/25" in first and "principal=Staff:t1" in first
    assert second.strip() == "→ ask the manager"


#: A reveal service audit record (guard/reveal/service.py `_reveal_audit`): position of the record revealed.
REVEAL = {**AUDIT, "worker": "reveal@h", "source_topic": "sanitized.br0101.public.customers", "op": "reveal",
          "subject": "subj-tok", "classes": {"C2": 2}, "actions": {"asked": 2, "given": 2}, "trace_id": "req-1"}


def _reveal(decision: str, **detail: object) -> dict[str, object]:
    doc = {"action": "reveal", "principal": "Staff::m0101", "purpose": "kyc_review", "image": "after",
           "asked": ["name", "mobile"], "given": ["name", "mobile"], "refused": {}, "policies": ["p1"],
           "request": "req-1", **detail}
    return {**REVEAL, "decision": decision, "reason": orjson.dumps(doc).decode()}


def test_principal_names_in_cedar_form_are_the_same_principal() -> None:
    assert principal_name("Staff::m0101") == "Staff:m0101"
    assert principal_name("Service::crm") == "Service:crm"


def test_reveal_service_audit_records_become_access_facts() -> None:
    [f] = from_audit(_reveal("reveal_allowed"), "guard.audit:2:40")
    assert (f.kind, f.action, f.principal, f.count, f.subject, f.id) == (
        "access", "reveal", "Staff:m0101", 1, "subj-tok", "guard.audit:2:40")
    # the catalog's categories of the fields given: name is identity, mobile is contact
    assert f.categories == {"identity": 1, "contact": 1} and f.columns == ["name", "mobile"]
    [p] = from_audit(_reveal("reveal_partial", given=["mobile"], refused={"name": "policy"}), "a:0:1")
    assert p.categories == {"contact": 1}, "refused fields are not counted"
    [d] = from_audit(_reveal("reveal_denied", given=[], policies=["nobody-outside-owner-after-cutoff"],
                             why=None), "a:0:2")
    assert (d.kind, d.principal, d.policies) == ("denied", "Staff:m0101", ["nobody-outside-owner-after-cutoff"])
    assert not from_audit(_reveal("reveal_not_found", given=[]), "a:0:3")
    assert not from_audit(_reveal("reveal_denied", principal=None, given=[]), "a:0:4"), "no token: no principal"
    search = {**REVEAL, "op": "search", "subject": None, "decision": "search_allowed", "reason": orjson.dumps({
        "action": "search", "principal": "Staff::t0101", "purpose": "kyc_review", "asked": ["mobile"],
        "given": ["mobile"], "values": 7, "policies": [], "request": "r"}).decode()}
    [s] = from_audit(search, "a:0:5")
    assert (s.kind, s.action, s.count, s.categories) == ("access", "search", 7, {"contact": 7})
    rec = AvroCodec("audit_record").encode(_reveal("reveal_allowed"))
    [via_kafka] = facts_from_record("guard.audit", 1, 3, 0, rec, topics=ROLES)
    assert via_kafka.kind == "access" and via_kafka.id == "guard.audit:1:3"
