"""`guard audit show`'s reading of an audit record: who, what, the decision and its policies, never a value."""

from __future__ import annotations

import orjson

from guard.cli.audit import audit_line, human_line, line_matches

WRITE = {"ts_ms": 1796000000000, "op": "d", "decision": "write_denied", "branch": "0101",
         "table": "public.transactions",
         "source_topic": "br0101.public.transactions", "source_partition": 0, "source_offset": 42, "subject": None,
         "trace_id": None, "worker": "w1",
         "reason": orjson.dumps({"decision": "deny", "principal": "Staff:k0101-08", "action": "delete",
                                 "policies": [], "reason": "no policy permits it (default deny)",
                                 "errors": []}).decode()}
REVEAL = {"ts_ms": 1796000000001, "op": "reveal", "decision": "reveal_partial", "branch": "0101",
          "table": "public.customers", "source_topic": "sanitized.br0101.public.customers", "source_partition": 0,
          "source_offset": 7, "subject": "abc", "trace_id": "r1", "worker": "reveal@h",
          "reason": orjson.dumps({"action": "reveal", "principal": "Staff::n0101-07", "purpose": "kyc_review",
                                  "asked": ["name", "x"], "given": ["name"], "refused": {"x": "unclassified"},
                                  "policies": ["manager-reveals-c2-for-service"]}).decode()}


def test_a_write_decision_reads_as_who_did_what_and_which_policies() -> None:
    line = audit_line("guard.audit[1]@5", WRITE)
    assert (line["principal"], line["action"], line["decision"], line["policies"]) == (
        "Staff:k0101-08", "delete", "write_denied", [])
    assert line["source"] == "br0101.public.transactions[0]@42"
    human = human_line(line)
    assert "write_denied principal=Staff:k0101-08 policies=none" in human
    assert "reason=no policy permits it (default deny)" in human


def test_a_changes_own_record_reads_as_its_write_decision() -> None:
    """Audit format 2: the change's own record carries its write decision; it reads (and filters) as it."""
    from guard.records.codec import write_reason

    detail = orjson.loads(WRITE["reason"])
    change = {**WRITE, "v": 2, "decision": "protected", "subject": "s-1", "reason": write_reason(detail)}
    line = audit_line("guard.audit[1]@6", change)
    assert (line["principal"], line["action"], line["decision"], line["change"]) == (
        "Staff:k0101-08", "delete", "write_denied", "protected")
    assert line_matches(line, ("write_*",), (), None, None) and line["subject"] == "s-1"
    assert "write_denied principal=Staff:k0101-08 policies=none" in human_line(line)


def test_filters_match_decisions_by_prefix_and_principals_in_every_spelling() -> None:
    write, reveal = audit_line("a", WRITE), audit_line("b", REVEAL)
    assert line_matches(write, ("write_*",), (), None, None) and not line_matches(reveal, ("write_*",), (), None, None)
    assert line_matches(reveal, ("reveal_partial",), ("reveal",), None, "r1")
    for spelling in ("Staff:n0101-07", "Staff::n0101-07", 'Staff::"n0101-07"', "n0101-07"):
        assert line_matches(reveal, (), (), spelling, None), spelling
    assert not line_matches(write, (), (), "Staff:n0101-07", None)


def test_a_reveal_line_names_fields_never_values() -> None:
    human = human_line(audit_line("b", REVEAL))
    assert 'asked=["name","x"]' in human and 'given=["name"]' in human and "request=r1" in human
    assert 'refused={"x":"unclassified"}' in human
