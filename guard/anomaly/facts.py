"""Facts: what the analyzers read, in one documented format, and the adapters that build them.

A fact is one thing that happened that a rule may count: a principal revealed, searched or exported records,
a row was written or deleted, a customer was erased, a record went to the DLQ, a principal or a transfer
changed state. Facts carry names, counts, keyed tokens and record references, never a value. The analyzers
never read plaintext: their inputs are the guard's own evidence topics (`guard.audit`, `guard.dlq`,
`guard.anomalies`, `guard.deletions`), the sanitized topics (tokens and masks only), and `guard.facts`,
where the policy engine and the reveal service write facts in this format directly (docs/anomalies.md,
"The fact format").

Every fact has an `id` that is stable across replays (the source record's `topic:partition:offset`, or
the producer's own id), which is what makes the analyzers' counters idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

from guard.classify.catalog import Catalog
from guard.errors import DecodeError
from guard.records.codec import decode, write_decision_of

FACT_VERSION = 1
FACTS_TOPIC = "guard.facts"

#: Fact kinds and what they mean (docs/anomalies.md lists the fields each uses).
KINDS = frozenset({
    "access",       # a principal read data: action reveal | search | export | view
    "write",        # a row was inserted or updated (CDC), with the changed columns' classes and tokens
    "delete",       # a row was deleted (CDC) or a delete was decided by the policy engine
    "erasure",      # a customer was erased (deletion confirmation) or an erasure was scheduled/requested
    "dlq",          # a record went to the DLQ (reason code)
    "integrity",    # a decryption, integrity or audit-chain failure
    "drift",        # personal data in a column the catalog doesn't know
    "transaction",  # a transaction on a customer's account, with an amount band computed where it was sealed
    "principal",    # a principal's state (active | disabled) and the organisation (owner) it belongs to
    "transfer",     # a branch transfer's state: from_owner, to_owner, cutoff_ms
    "denied",       # a decision that refused an action (policy engine)
    "anomaly",      # one of the sanitizer's own anomalies (re-issued as an alert with a stable id)
})


@dataclass(slots=True)
class Fact:
    """One fact (docs/anomalies.md, "The fact format"). Only `kind`, `id`, `ts_ms` and `branch` are required."""

    kind: str
    id: str
    ts_ms: int
    branch: str
    principal: str | None = None
    action: str | None = None
    table: str | None = None
    subject: str | None = None
    #: Records the fact covers (an export of 300 customers is one fact with count 300).
    count: int = 1
    #: Data categories touched (catalog categories: contact, account, transaction, identity, ...) → records.
    categories: dict[str, int] = field(default_factory=dict)
    #: Columns changed (write) or read (access), by name.
    columns: list[str] = field(default_factory=list)
    #: Blind-index tokens of the new values of changed columns (column → token); never values.
    tokens: dict[str, str] = field(default_factory=dict)
    decision: str | None = None
    policies: list[str] = field(default_factory=list)
    #: Why (an erasure ticket, a reason code, a DLQ reason); a delete with a reason is explained.
    reason: str | None = None
    #: Where the fact comes from: "topic:partition:offset".
    ref: str | None = None
    #: Kind-specific attributes: amount_band (transaction), state/owner (principal),
    #: from_owner/to_owner/cutoff_ms (transfer), root (delete of a subject's root row).
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps({"v": FACT_VERSION, **asdict(self)})

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> Fact:
        """A fact from its JSON form; raises DecodeError on a missing or malformed required field."""
        try:
            kind, fid, ts_ms, branch = str(doc["kind"]), str(doc["id"]), int(doc["ts_ms"]), str(doc["branch"])
        except (KeyError, TypeError, ValueError):
            raise DecodeError("bad_fact", "a fact needs kind, id, ts_ms and branch") from None
        if kind not in KINDS:
            raise DecodeError("bad_fact", f"unknown fact kind {kind!r}")
        return cls(kind=kind, id=fid, ts_ms=ts_ms, branch=branch, principal=doc.get("principal"),
                   action=doc.get("action"), table=doc.get("table"), subject=doc.get("subject"),
                   count=max(1, int(doc.get("count") or 1)), categories=dict(doc.get("categories") or {}),
                   columns=list(doc.get("columns") or []), tokens=dict(doc.get("tokens") or {}),
                   decision=doc.get("decision"), policies=list(doc.get("policies") or []),
                   reason=doc.get("reason"), ref=doc.get("ref"), attrs=dict(doc.get("attrs") or {}))


# --- adapters: one source record → facts ---------------------------------------------------------------
def facts_from_record(topic: str, partition: int, offset: int, ts_ms: int, value: bytes | None,
                      *, topics: Mapping[str, str], catalog: Catalog | None = None) -> list[Fact]:
    """The facts of one record of a topic the analyzers read (empty: nothing to count).

    `topics` maps the roles `audit`, `dlq`, `anomalies`, `deletions`, `facts` to topic names; any other
    topic is read as a sanitized change topic. Records the analyzers wrote themselves (alerts on the
    anomalies topic) yield nothing. Undecodable records raise DecodeError (the agent counts and skips them:
    they are evidence the guard wrote, and a broken one is itself reported as an integrity fact).
    """
    if value is None:
        return []
    ref = f"{topic}:{partition}:{offset}"
    if topic == topics.get("facts"):
        doc = orjson.loads(value)
        return [Fact.from_mapping({**doc, "ref": doc.get("ref") or ref})]
    if topic == topics.get("audit"):
        return from_audit(decode(value), ref, catalog)
    if topic == topics.get("dlq"):
        return from_dlq(orjson.loads(value), ref, ts_ms)
    if topic == topics.get("anomalies"):
        if value[:1] != b"{":
            return []  # an Avro alert of the analyzers themselves
        return from_legacy_anomaly(orjson.loads(value), ref, ts_ms)
    if topic == topics.get("deletions"):
        return from_deletion(orjson.loads(value), ref, ts_ms)
    return from_sanitized(decode(value), ref)


#: Audit decisions of the sanitizer (schemas/audit_record.avsc) that the analyzers count.
_INTEGRITY_REASONS = ("decrypt", "integrity", "aad", "tamper", "chain")


def principal_name(text: Any) -> str | None:
    """A principal as the analyzers name it: `Staff:<id>` or `Service:<id>` (a bare id is staff; the Cedar
    form `Staff::<id>` that the reveal service and the policy's entities use is the same principal)."""
    if not isinstance(text, str) or not text.strip():
        return None
    kind, sep, ident = text.strip().partition(":")
    return f"{kind}:{ident.lstrip(':')}" if sep else f"Staff:{kind}"


def from_audit(rec: Mapping[str, Any], ref: str, catalog: Catalog | None = None) -> list[Fact]:
    """Facts of an audit record (schemas/audit_record.avsc).

    * the sanitizer's per-event decisions: a delete (`op` d) is a `delete` fact; an erasure (`op` erase) an
      `erasure` fact, except `root_delete_unconfigured`: a delete of a customer's root row that nothing
      explains; a DLQ decision whose reason names an integrity failure is an `integrity` fact;
    * the policy engine's write decisions (issue 14, `write_decision_of`): `write_allowed` → `write` (or
      `delete`) by its principal, `write_denied` → `denied`; the decision JSON names principal, action and
      policies. Audit format 2 carries the decision in the change's own record (`reason`), so one record
      yields both its change's facts and its decision's (id `<ref>:policy`); format 1 wrote it as a record of
      its own at the same source offset, which yields the decision's facts only, so a delete is counted once
      either way.
    * the reveal service's decisions (`op` reveal or search, decision `reveal_*` / `search_*`,
      `from_reveal_audit`): `access` facts for what it gave, `denied` facts for what it refused;
    * reads written to the audit topic with `principal`, `action`, `count` and `categories` fields.
    """
    ts, branch = int(rec["ts_ms"]), str(rec["branch"])
    decision, op = rec.get("decision"), rec.get("op")
    if op in REVEAL_OPS and str(decision).startswith(f"{op}_"):
        return from_reveal_audit(rec, ref, catalog)
    common: dict[str, Any] = {"ts_ms": ts, "branch": branch, "principal": principal_name(rec.get("principal")),
                              "table": rec.get("table"), "subject": rec.get("subject"), "ref": ref,
                              "policies": list(rec.get("policies") or [])}
    write = write_decision_of(rec)
    if write is None:
        return _change_facts(rec, ref, common, rec.get("reason"))
    name, detail = write
    policy = {**common, "principal": principal_name(detail.get("principal")),
              "policies": list(detail.get("policies") or [])}
    action = str(detail.get("action") or ("delete" if op == "d" else "write"))
    facts: list[Fact] = []
    if name == "write_denied":
        facts.append(Fact("denied", ref + ":policy", action=action, decision="deny", reason=detail.get("reason"),
                          **policy))
    elif name == "write_allowed" and policy["principal"]:
        # a decision, not the change: counted by the principal and transfer rules only
        facts.append(Fact("write", ref + ":policy", action=action, decision="allow", **policy))
    if decision == name:
        return facts  # format 1: the decision's own record
    return [*_change_facts(rec, ref, common, None), *facts]


def _change_facts(rec: Mapping[str, Any], ref: str, common: dict[str, Any], reason: str | None) -> list[Fact]:
    """The facts of an audit record's own decision; `reason` is None when it holds the write decision."""
    decision, op = rec.get("decision"), rec.get("op")
    if decision in ("deny", "denied"):
        return [Fact("denied", ref, action=rec.get("action") or op, decision="deny", reason=reason, **common)]
    if op == "d" and decision in ("protected", "erased_delete"):
        return [Fact("delete", ref, action="delete", decision=decision, reason=rec.get("ticket") or None,
                     columns=list(rec.get("columns") or []), **common)]
    if op == "erase":
        if reason == "root_delete_unconfigured":
            # the delete of a customer's root row that no catalog meaning (nor request) explains
            return [Fact("delete", ref + ":unexplained", action="delete", decision="unexplained",
                         attrs={"root": True, "explained": False}, **common)]
        return [Fact("erasure", ref + ":erase", action=str(decision), decision=str(decision), reason=reason,
                     **common)]
    if decision == "dlq" and reason and any(word in reason for word in _INTEGRITY_REASONS):
        return [Fact("integrity", ref, reason=reason, **common)]
    if rec.get("action") in ("reveal", "search", "export", "view") and common["principal"]:
        cats = dict(rec.get("categories") or {}) or {c: 1 for c in rec.get("classes") or {}}
        return [Fact("access", ref, action=rec["action"], count=int(rec.get("count") or 1), categories=cats,
                     columns=list(rec.get("columns") or []), decision="allow", **common)]
    return []


def from_dlq(doc: Mapping[str, Any], ref: str, ts_ms: int) -> list[Fact]:
    """A DLQ record (guard/records/builders.py `dlq`): one `dlq` fact with its reason code."""
    reason = str(doc.get("reason") or "unknown")
    kind = "integrity" if any(word in reason for word in _INTEGRITY_REASONS) else "dlq"
    source = doc.get("source") or {}
    src = f"{source.get('topic')}:{source.get('partition')}:{source.get('offset')}" if source else ref
    return [Fact(kind, ref, int(doc.get("at_ms") or ts_ms), str(doc.get("branch") or ""), reason=reason,
                 ref=src, table=None)]


#: The reveal service's audit ops (guard/reveal/service.py): decisions are `<op>_<outcome>`.
REVEAL_OPS = ("reveal", "search")
_catalog: Catalog | None = None


def default_catalog() -> Catalog:
    """The catalog the reveal records' fields are categorised with (`GUARD_CATALOG`, else the checkout's)."""
    global _catalog
    if _catalog is None:
        _catalog = Catalog.load()
    return _catalog


def field_categories(catalog: Catalog, table: str | None, fields: list[str]) -> list[str]:
    """The catalog's data categories of `fields` of `table` (a field it doesn't know: `other`)."""
    out: list[str] = []
    for name in fields:
        column = catalog.column(table, name) if table else None
        category = column.category if column is not None else "other"
        if category not in out:
            out.append(category)
    return out


def from_reveal_audit(rec: Mapping[str, Any], ref: str, catalog: Catalog | None = None) -> list[Fact]:
    """A reveal service audit record (docs/reveal.md, "Audit") as a fact, by the call's outcome:

    * `reveal_allowed` / `reveal_partial`: an `access` fact, action `reveal`, one record (count 1) of each
      data category of the fields *given* (the catalog's categories; fields refused are not counted);
    * `search_allowed`: an `access` fact, action `search`, count = the values searched, in the column's
      category;
    * `reveal_denied` / `search_denied` by an authenticated principal: a `denied` fact naming the
      policies that decided (a denial by the cut-off policy is an access after the transfer's cut-off);
    * not found, errors, and calls without a principal (no or unknown token): nothing (no principal to count).

    The principal is the token's (`Staff::<id>` → `Staff:<id>`); the subject is the record's keyed token.
    """
    op = str(rec["op"])
    outcome = str(rec["decision"])[len(op) + 1:]
    try:
        detail = orjson.loads(rec.get("reason") or "{}")
    except orjson.JSONDecodeError:
        raise DecodeError("bad_audit", "a reveal audit record whose reason is not JSON") from None
    if not isinstance(detail, dict):
        return []
    principal = principal_name(detail.get("principal"))
    if principal is None:
        return []
    table = rec.get("table")
    common: dict[str, Any] = {"ts_ms": int(rec["ts_ms"]), "branch": str(rec["branch"]), "principal": principal,
                              "table": table, "subject": rec.get("subject"), "ref": ref,
                              "policies": [str(p) for p in detail.get("policies") or []]}
    if outcome in ("allowed", "partial"):
        given = [str(f) for f in detail.get("given") or []]
        if not given:
            return []
        count = max(1, int(detail.get("values") or 1)) if op == "search" else 1
        cats = field_categories(catalog or default_catalog(), table, given)
        return [Fact("access", ref, action=op, count=count, categories={c: count for c in cats}, columns=given,
                     decision="allow", reason=detail.get("purpose"), **common)]
    if outcome == "denied":
        return [Fact("denied", ref, action=op, decision="deny", reason=detail.get("why"), **common)]
    return []


def from_legacy_anomaly(doc: Mapping[str, Any], ref: str, ts_ms: int) -> list[Fact]:
    """The sanitizer's JSON anomalies: schema drift → `drift`; every other one (writes for erased subjects,
    root truncates, rows without a subject, unconfigured root deletes, the policy engine's `write_denied`
    and `write_unattributed`) → `anomaly`, which the analyzer re-issues as an alert with a stable id (one
    per rule, table and day), so on-call sees one format and a repeated condition once."""
    if doc.get("type") != "anomaly":
        return []
    rule = str(doc.get("rule") or "")
    column = doc.get("column")
    kind = "drift" if rule.startswith("schema_drift") else "anomaly"
    return [Fact(kind, ref, int(doc.get("at_ms") or ts_ms), str(doc.get("branch") or ""), table=doc.get("table"),
                 columns=[column] if column else [], reason=rule, ref=ref,
                 principal=principal_name(doc.get("principal")), action=doc.get("action"),
                 attrs={"severity": doc.get("severity"), "category": doc.get("category"),
                        "what": doc.get("what"), "suggested_action": doc.get("suggested_action")})]


def from_deletion(doc: Mapping[str, Any], ref: str, ts_ms: int) -> list[Fact]:
    """A deletion confirmation (guard.deletions): an `erasure` fact for the status page and the delete rules."""
    if doc.get("type") != "deletion_confirmation":
        return []
    return [Fact("erasure", ref, int(doc.get("at_ms") or ts_ms), str(doc.get("branch") or ""),
                 subject=doc.get("subject"), action=str(doc.get("outcome")), decision=str(doc.get("outcome")),
                 reason=str(doc.get("reason_code") or ""), ref=ref,
                 attrs={"trigger": doc.get("trigger"), "confirmation": doc.get("id")})]


#: The branch database's staff table (issue 14): its rows are the policy's Staff entities, in clear.
STAFF_TABLE = "public.staff"


def from_staff(rec: Mapping[str, Any], ref: str) -> list[Fact]:
    """A change of `public.staff` (sanitized; staff_id, organisation, active are clear columns): the
    principal registry's feed — a member of staff disabled or moved to another organisation."""
    op = rec.get("op")
    image = (rec.get("before") if op == "d" else rec.get("after")) or {}
    clear = image.get("clear") or {}
    staff = clear.get("staff_id")
    if not staff:
        return []
    active = op != "d" and str(clear.get("active")).lower() in ("true", "1", "t")
    return [Fact("principal", ref, int(rec.get("source_ts_ms") or rec.get("ts_ms") or 0), str(rec.get("branch")),
                 principal=f"Staff:{staff}", ref=ref,
                 attrs={"state": "active" if active else "disabled", "owner": clear.get("organisation")})]


def facts_from_policy_entities(entities: list[Mapping[str, Any]], ts_ms: int) -> list[Fact]:
    """The policy's entities (policy/entities.json, Cedar JSON) as registry facts: every `Staff` and
    `Service` a `principal` fact (state from `active`, owner = its organisation), every `Branch` with a
    `cutoff` a `transfer` fact (`to_owner` = its `owner`: from the cut-off on nobody outside it may touch
    the branch's customers; `state` = its `transfer_state`)."""
    out: list[Fact] = []
    for e in entities:
        kind = str(e["uid"]["type"]).rsplit("::", 1)[-1]
        ident, attrs = str(e["uid"]["id"]), e.get("attrs") or {}
        if kind in ("Staff", "Service"):
            org = (attrs.get("organisation") or {}).get("__entity", {}).get("id")
            branch = (attrs.get("branch") or {}).get("__entity", {}).get("id") or ""
            out.append(Fact("principal", f"entity:{kind}:{ident}:{ts_ms}", ts_ms, str(branch),
                            principal=f"{kind}:{ident}",
                            attrs={"state": "active" if attrs.get("active", True) else "disabled", "owner": org}))
        elif kind == "Branch" and attrs.get("cutoff"):
            cutoff = (attrs["cutoff"].get("__extn") or {}).get("arg") if isinstance(attrs["cutoff"], dict) \
                else attrs["cutoff"]
            owner = (attrs.get("owner") or {}).get("__entity", {}).get("id")
            cutoff_ms = int(datetime.fromisoformat(str(cutoff).replace("Z", "+00:00")).timestamp() * 1000)
            out.append(Fact("transfer", f"entity:Branch:{ident}:{ts_ms}", ts_ms, ident,
                            attrs={"to_owner": owner, "from_owner": attrs.get("previous_owner"),
                                   "cutoff_ms": cutoff_ms, "state": attrs.get("transfer_state")}))
    return out


#: Columns whose change is a contact-detail change (takeover patterns); the catalog's contact and location.
CONTACT_COLUMNS = ("mobile", "phone", "email", "address")


def from_sanitized(rec: Mapping[str, Any], ref: str) -> list[Fact]:
    """A sanitized change (schemas/sanitized_change.avsc): `write` facts with the blind-index tokens of the
    changed contact columns (before and after tokens compared, never values), `delete` facts, and the
    principal from the row's `updated_by` column when the branch database records it (issue 14)."""
    op, after, before = rec.get("op"), rec.get("after") or {}, rec.get("before") or {}
    base: dict[str, Any] = {"ts_ms": int(rec.get("source_ts_ms") or rec.get("ts_ms") or 0),
                            "branch": str(rec.get("branch")), "table": rec.get("table"),
                            "subject": rec.get("subject"), "ref": ref}
    image = after if op != "d" else before
    principal = principal_name((image.get("clear") or {}).get("updated_by")) if image else None
    if rec.get("table") == STAFF_TABLE:
        return from_staff(rec, ref)
    if op == "d":
        return [Fact("delete", ref, action="delete", principal=principal, **base)]
    if op not in ("c", "u", "r"):
        return []
    new_idx, old_idx = (after.get("index") or {}), (before.get("index") or {})
    if op != "u":
        return []  # a new customer's contact details are not a change of them
    changed = sorted(c for c, tok in new_idx.items() if c in CONTACT_COLUMNS and old_idx.get(c) != tok)
    if not changed:
        return []
    return [Fact("write", ref, action="update", principal=principal, columns=changed,
                 tokens={c: str(new_idx[c]) for c in changed}, categories={"contact": 1}, **base)]

