"""The transfer report, as JSON and as an HTML document a compliance officer can file.

Sections: the plan; timings (from the transfer's state); counts moved (customers of the branch database;
ids the plan names that the database lacks are counted apart), destroyed (shredded by the transfer only,
with the deletion confirmations' ids, checked against `guard.deletions`; every other out-of-scope outcome
under its own name) and held storage-only (the plan's retentions and the legal holds, with their basis);
the key handover (versions installed and retired, data keys re-wrapped); every access attempt after the
cut-off by the former owner's staff, with its decision (from `guard.audit`); the anomalies raised during the
transfer (`guard.anomalies`); and the verification of the audit chains over the transfer's span (computed
by `complete`, kept in the state).

Deterministic: the content comes from the state and from the topics' records inside the transfer's window
(start to completion), sorted; no generation time is written. Regenerating the report of a completed
transfer gives the same bytes. A transfer not completed yet gets a report marked `provisional` (its window
is still open).
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer

from guard.anomaly.alerts import read_anomaly
from guard.audit.verify import Observed, chain_leaves, verify
from guard.config import Settings
from guard.kafka.audit_chain import read_topic, second_store
from guard.kafka.reading import READER_SETTINGS, read_to_end
from guard.kafka_security import client_config
from guard.records.codec import decode, write_decision_of
from guard.transfer.plan import DESTROY, MOVE, RETAIN

#: Records of the window are read from this long before it (producer clocks, transaction timestamps).
SKEW_MS = 60_000
#: The policies whose denial means "the cut-off": named in the access section.
CUTOFF_POLICIES = ("nobody-outside-owner-after-cutoff", "freeze-between-cutoff-and-cutover")
#: The decision of an access that returned only part of what was asked (plaintext all the same): counted
#: as allowed, like every `*_allowed` decision, and also on its own (`allowed_in_part`).
PARTLY_ALLOWED = ("reveal_partial",)
#: The out-of-scope outcome of a customer whose keys the transfer destroyed: the only one under `destroyed`.
#: The others keep their own names: `held_storage_only` (a legal hold: kept, counted as held),
#: `erased_before_transfer`, `no_keys` (nothing was sealed under a key), `not_erased`.
SHREDDED, HELD_BY_LEGAL_HOLD = "shredded", "held_storage_only"


def reader_group(settings: Settings) -> str:
    """The reader's fixed group id (it assigns partitions and never commits): `oncall-transfer-report` as the
    `oncall` principal, whose group ACL covers `oncall-*`; `guard-transfer-report` (the guard's tools) else."""
    return "oncall-transfer-report" if settings.kafka_username == "oncall" else "guard-transfer-report"


def read_window(settings: Settings, topic: str, since_ms: int, *, stall_s: float = 120.0
                ) -> list[tuple[int, str, bytes | None, bytes | None]]:
    """(Kafka timestamp, where, key, value) of every committed record of `topic` from `since_ms` on."""
    consumer = Consumer(client_config(settings, **{"group.id": reader_group(settings), **READER_SETTINGS}))
    out: list[tuple[int, str, bytes | None, bytes | None]] = []
    try:
        for msg in read_to_end(consumer, topic, since_ms=max(0, since_ms), stall_s=stall_s):
            out.append((int(msg.timestamp()[1]), f"{topic}[{msg.partition()}]@{msg.offset()}", msg.key(), msg.value()))
        return out
    finally:
        consumer.close()


def verify_span(settings: Settings, state: dict[str, Any], verifier: Any,
                checkpoints: dict[str, str]) -> dict[str, Any]:
    """Verify every audit chain that began within the transfer's span (from its start), on `guard.audit` and
    `guard.deletions`: the transfer's own chains, the erasures' and reveals' chains, workers' chains
    started meanwhile. Chains begun before the start are not complete in the span: `guard audit verify`
    over the whole topics covers them."""
    since = int(state["started_ms"]) - 1000
    leaves, kept = read_topic(settings, settings.audit_topic, since_ms=since)
    more, kept_more = read_topic(settings, settings.deletions_topic, since_ms=since, confirmations=True)
    leaves += more
    kept = [*kept, *kept_more, *second_store(checkpoints)]
    chains, unchained = chain_leaves(leaves)
    begun = {name for name, ls in chains.items() if any(leaf.seq == 0 for leaf in ls)}
    in_span = [r for r in leaves if r.header is not None and _chain_of(r) in begun]
    report = verify(in_span, kept, verifier, chains_filter=begun)
    own = sorted(c for c in begun if f"cli:transfer-{state['id']}/" in c)
    return {"ok": report.ok, "since_ms": since, "chains_verified": len(report.chains), "records": report.records,
            "checkpoints_read": report.checkpoints, "transfer_chains": own,
            "unanchored": sum(c.unanchored for c in report.chains),
            "records_without_chain_in_span": len(unchained),
            "breaks": [b.line() for b in report.breaks]}


def _chain_of(rec: Observed) -> str | None:
    from guard.audit.chain import parse_prefix

    try:
        return parse_prefix(rec.header or b"").chain
    except (ValueError, UnicodeDecodeError):
        return None


def _principal(text: Any) -> str | None:
    if not text:
        return None
    t = str(text)
    if '::"' in t:
        kind, ident = t.split('::"', 1)
        return f"{kind.rsplit('::', 1)[-1]}:{ident.rstrip(chr(34))}"
    return t.replace("::", ":")


def build(settings: Settings, state: dict[str, Any],
          reader: Callable[[str, int], list[tuple[int, str, bytes | None, bytes | None]]] | None = None
          ) -> dict[str, Any]:
    """The report's content (a dict: dumped sorted as JSON, rendered as HTML)."""
    read = reader or (lambda topic, since: read_window(settings, topic, since))
    plan = state["plan"]
    branch = plan["branch"]
    started, end = int(state["started_ms"]), state.get("completed_ms")
    cutoff = _cutoff_ms(plan["cutoff"])

    def within(ts: int) -> bool:
        return ts >= started and (end is None or ts <= int(end))

    scope = state.get("scope") or {MOVE: [], DESTROY: [], RETAIN: []}
    destroyed = state.get("destroyed") or {}
    # The scope step records which subjects of the scope the branch database did not have (named by the plan
    # only); a state recorded before it did says nothing, and then `moved` is None (`move_scope` counts all).
    absent: set[str] | None = set(scope["not_in_database"]) if "not_in_database" in scope else None
    in_scope = {MOVE: list(scope.get(MOVE) or []), DESTROY: list(scope.get(DESTROY) or []),
                RETAIN: [r["subject"] for r in scope.get(RETAIN) or []]}
    moved = sorted(in_scope[MOVE] if absent is None else set(in_scope[MOVE]) - absent)
    held = [{"subject": s, "held_by": "retention", "confirmation": None, **r}
            for s, r in (state.get("retained") or {}).items()]
    held += [{"subject": s, "held_by": "legal_hold", "confirmation": d.get("id"), "until_ms": None,
              "legal_basis": "a legal hold: the erasure waits for its release"}
             for s, d in destroyed.items() if d.get("outcome") == HELD_BY_LEGAL_HOLD]
    held.sort(key=lambda h: h["subject"])
    ids = {d["id"] for d in destroyed.values() if d.get("id")}
    # confirmations as the deletions topic has them
    seen: dict[str, int] = {}
    for _, _, _, value in read(settings.deletions_topic, started - SKEW_MS):
        try:
            cid = orjson.loads(value or b"{}").get("id")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if cid in ids:
            seen[cid] = seen.get(cid, 0) + 1
    former = set((state["steps"].get("policy") or {}).get("former_staff") or [])
    attempts: list[dict[str, Any]] = []
    steps_audited: list[dict[str, Any]] = []
    for ts, where, _, value in read(settings.audit_topic, min(started, cutoff) - SKEW_MS):
        try:
            doc = decode(value or b"")
        except Exception:  # noqa: BLE001, S112 - not an audit record (a probe): not this report's
            continue
        if str(doc.get("branch")) != branch or doc.get("decision") == "checkpoint":
            continue
        at = int(doc.get("ts_ms") or ts)
        if doc.get("op") in ("transfer", "erase") and doc.get("source_topic") == f"transfer/{state['id']}":
            steps_audited.append({"at_ms": at, "op": doc.get("op"), "decision": doc.get("decision"), "where": where,
                                  "subject": doc.get("subject")})
            continue
        write = write_decision_of(doc)  # audit format 2: in the change's own record; 1: a record of its own
        if write is not None:
            decision, detail = write
        else:
            decision = str(doc.get("decision") or "")
            if not decision.startswith(("reveal_", "search_")):
                continue
            try:
                detail = orjson.loads(doc.get("reason") or "{}")
            except orjson.JSONDecodeError:
                detail = {}
        principal = _principal(detail.get("principal"))
        policies = list(detail.get("policies") or [])
        if at < cutoff or (end is not None and at > int(end)):
            continue
        if principal not in former and not set(policies) & set(CUTOFF_POLICIES):
            continue
        attempts.append({"at_ms": at, "principal": principal, "action": detail.get("action") or doc.get("op"),
                         "decision": decision, "policies": policies, "table": doc.get("table"),
                         "subject": doc.get("subject"), "where": where,
                         "source": f"{doc.get('source_topic')}[{doc.get('source_partition')}]@"
                                   f"{doc.get('source_offset')}"})
    attempts.sort(key=lambda a: (a["at_ms"], a["where"]))
    anomalies: list[dict[str, Any]] = []
    for ts, where, _, value in read(settings.anomalies_topic, started - SKEW_MS):
        if not within(ts) or not value:
            continue
        try:
            doc = read_anomaly(value)
        except Exception:  # noqa: BLE001, S112 - another writer's probe: not an anomaly of this report
            continue
        if str(doc.get("branch")) != branch:
            continue
        anomalies.append({"at_ms": ts, "rule": doc.get("rule"), "severity": doc.get("severity"),
                          "principal": doc.get("principal"), "summary": str(doc.get("summary") or "")[:300],
                          "where": where})
    anomalies.sort(key=lambda a: (a["at_ms"], a["where"]))
    by_decision: dict[str, int] = {}
    for a in attempts:
        by_decision[a["decision"]] = by_decision.get(a["decision"], 0) + 1
    outcomes: dict[str, int] = {}
    for d in destroyed.values():
        outcomes[d["outcome"]] = outcomes.get(d["outcome"], 0) + 1
    steps = state.get("steps") or {}
    return {
        "report": "branchguard transfer report v1",
        "transfer": state["id"], "phase": state["phase"], "provisional": state["phase"] != "completed",
        "plan": plan,
        "timings": {"started_ms": started, "cutoff_ms": cutoff, "cutover_started_ms": state.get("cutover_started_ms"),
                    "cutover_done_ms": state.get("cutover_done_ms"), "completed_ms": end,
                    "steps": {s: {"done_ms": v.get("done_ms"), "took_ms": v.get("took_ms")} for s, v in steps.items()}},
        "counts": {"moved": None if absent is None else len(moved), "move_scope": len(in_scope[MOVE]),
                   "named_by_plan_not_in_database": None if absent is None else {
                       d: len(set(subjects) & absent) for d, subjects in in_scope.items()},
                   "destroyed": outcomes.get(SHREDDED, 0), "out_of_scope": len(in_scope[DESTROY]),
                   "destroy_outcomes": outcomes, "held_storage_only": len(held),
                   "held_by_retention": sum(1 for h in held if h["held_by"] == "retention"),
                   "held_by_legal_hold": sum(1 for h in held if h["held_by"] == "legal_hold"),
                   "customers_in_database": (steps.get("scope") or {}).get("customers_in_database"),
                   "confirmations": len(ids), "confirmations_on_topic": len(seen),
                   "confirmations_written_twice": sorted(c for c, n in seen.items() if n > 1)},
        "moved": moved,
        "not_in_database": sorted(absent or []),
        "destroyed": [{"subject": s, "confirmation": d.get("id"), "outcome": d.get("outcome")}
                      for s, d in sorted(destroyed.items()) if d.get("outcome") == SHREDDED],
        "out_of_scope_not_destroyed": [{"subject": s, "confirmation": d.get("id"), "outcome": d.get("outcome")}
                                       for s, d in sorted(destroyed.items()) if d.get("outcome") != SHREDDED],
        "held": held,
        "keys": {"handover": state.get("kek"), "rewrap": steps.get("rewrap"), "retire": steps.get("retire"),
                 "tenant_keys": "unchanged: subject tokens and blind indexes stay stable (docs/transfer.md)"},
        "policy": steps.get("policy"),
        "access_after_cutoff": {"former_staff": sorted(former), "attempts": attempts, "by_decision": by_decision,
                                "allowed": sum(1 for a in attempts if _allowed(a["decision"])),
                                "allowed_in_part": sum(1 for a in attempts if a["decision"] in PARTLY_ALLOWED)},
        "anomalies": anomalies,
        "audit_records_of_the_transfer": sorted(steps_audited, key=lambda a: (a["at_ms"], a["where"])),
        "verification": state.get("verification"),
    }


def _allowed(decision: str) -> bool:
    """Whether an access got through, at least in part (a partial reveal returned plaintext too)."""
    return decision.endswith("_allowed") or decision in PARTLY_ALLOWED


def _cutoff_ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def to_json(report: dict[str, Any]) -> bytes:
    return orjson.dumps(report, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def _ts(ms: Any) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(ms) / 1000)) + f".{int(ms) % 1000:03d}Z"


def _rows(items: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c, it.get(c)))}</td>" for c in cols) + "</tr>"
                   for it in items)
    return f"<table><tr>{head}</tr>{body or '<tr><td colspan=' + str(len(cols)) + '>none</td></tr>'}</table>"


def _cell(col: str, value: Any) -> str:
    if col.endswith("_ms") and isinstance(value, int):
        return _ts(value)
    if isinstance(value, list | dict):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return "-" if value is None else str(value)


def to_html(r: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (no scripts, no external resources)."""
    p, c, t = r["plan"], r["counts"], r["timings"]
    v = r.get("verification") or {}
    steps = [{"step": s, "done_ms": d.get("done_ms"), "took_ms": d.get("took_ms")} for s, d in t["steps"].items()]
    access = r["access_after_cutoff"]
    esc = html.escape
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Transfer {esc(r['transfer'])}: branch {esc(p['branch'])}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #999;padding:.2em .5em;font-size:90%;text-align:left;vertical-align:top}}
.bad{{color:#a00;font-weight:bold}}.ok{{color:#070;font-weight:bold}}</style></head><body>
<h1>Branch transfer {esc(r['transfer'])}</h1>
<p>Branch <b>{esc(p['branch'])}</b> from <b>{esc(p['from'])}</b> to <b>{esc(p['to'])}</b>, cut-off
<b>{esc(p['cutoff'])}</b>, ordered by {esc(p['by'])}. Phase: <b>{esc(r['phase'])}</b>{
    ' <span class="bad">(provisional: the transfer is not completed)</span>' if r['provisional'] else ''}.
Plan digest (SHA-256 of the plan file): <code>{esc(p.get('digest') or '')}</code>.</p>
<h2>Plan</h2><pre>{esc(orjson.dumps(p['scope'], option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode())}</pre>
<h2>Timings</h2>
{_rows([{"event": "started", "at_ms": t['started_ms']}, {"event": "cut-off", "at_ms": t['cutoff_ms']},
        {"event": "cut-over began", "at_ms": t['cutover_started_ms']},
        {"event": "cut-over done", "at_ms": t['cutover_done_ms']}, {"event": "completed", "at_ms": t['completed_ms']}],
       ["event", "at_ms"])}
{_rows(steps, ["step", "done_ms", "took_ms"])}
<h2>Counts</h2>
{_rows([{"what": k, "count": val} for k, val in sorted(c.items())], ["what", "count"])}
<h2>Destroyed (crypto-shredded by the transfer, signed confirmations on guard.deletions)</h2>
{_rows(r['destroyed'], ["subject", "confirmation", "outcome"])}
<h2>Out of scope, not destroyed by the transfer</h2>
<p>Held by a legal hold, erased before the transfer, never keyed (no_keys) or not erased.</p>
{_rows(r['out_of_scope_not_destroyed'], ["subject", "confirmation", "outcome"])}
<h2>Held storage-only</h2>
{_rows(r['held'], ["subject", "held_by", "legal_basis", "until_ms", "confirmation"])}
<h2>Moved</h2><p>{len(r['moved'])} customers of the branch database (subject tokens):</p>
<pre>{esc(' '.join(r['moved']))}</pre>
<p>Named by the plan, not in the branch database (nothing of theirs moved or was destroyed):
{len(r['not_in_database'])}</p><pre>{esc(' '.join(r['not_in_database']))}</pre>
<h2>Keys</h2><pre>{esc(orjson.dumps(r['keys'], option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode())}</pre>
<h2>Policy</h2><pre>{esc(orjson.dumps(r['policy'], option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode())}</pre>
<h2>Access attempts after the cut-off by the former owner's staff</h2>
<p>{len(access['attempts'])} attempts; by decision: {esc(orjson.dumps(access['by_decision'],
                                                                       option=orjson.OPT_SORT_KEYS).decode())};
<span class="{'bad' if access['allowed'] else 'ok'}">{access['allowed']} allowed ({
    access['allowed_in_part']} of them in part)</span>.</p>
{_rows(access['attempts'], ["at_ms", "principal", "action", "decision", "policies", "table", "subject", "where"])}
<h2>Anomalies raised during the transfer</h2>
{_rows(r['anomalies'], ["at_ms", "rule", "severity", "principal", "summary", "where"])}
<h2>Verification</h2>
<p class="{'ok' if v.get('ok') else 'bad'}">Audit chains over the transfer's span: {
    'verified' if v.get('ok') else 'NOT verified'}</p>
{_rows([{"what": k, "value": val} for k, val in sorted(v.items())], ["what", "value"])}
<h2>The transfer's own audit records</h2>
{_rows(r['audit_records_of_the_transfer'], ["at_ms", "op", "decision", "subject", "where"])}
</body></html>
"""


__all__ = ["build", "to_html", "to_json", "verify_span"]
