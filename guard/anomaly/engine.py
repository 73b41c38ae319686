"""The analyzer: facts in, alert records out, every rule's state in Redis (guard/anomaly/state.py).

`Analyzer.process(fact)` runs the rules of the fact's branch and returns the alerts to write now: an alert
whose condition is new, whose count doubled since it was last written, or whose last write is older than
`delivery.min_update_interval_s` (others are merged into the stored state and written by `flush`). The
caller writes them to Kafka, waits for the acknowledgement, then calls `emitted` — so a crash between the
state update and the write re-sends the same alert id on replay (at-least-once, idempotent by id).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from guard.anomaly.alerts import AlertCodec, Condition
from guard.anomaly.facts import Fact
from guard.anomaly.rules import RuleConfig
from guard.anomaly.state import AnomalyState

DAY_MS = 86_400_000
ACCESS_ACTIONS = ("reveal", "search", "export", "view")
#: Far-future end of windows of immediate rules (the alert lives until resolved).
NO_END = 0


@dataclass(slots=True)
class Emit:
    """One alert version to write: its id (the Kafka key), the record, the encoded value."""

    id: str
    version: int
    count: int
    severity: str
    record: dict[str, Any]
    value: bytes


def _window(ts_ms: int, window_s: int) -> tuple[int, int]:
    size = max(1, int(window_s)) * 1000
    start = ts_ms - ts_ms % size
    return start, start + size


class Analyzer:
    """Runs the rules over facts. One instance per worker; all shared state is in Redis."""

    def __init__(self, state: AnomalyState, rules: RuleConfig, *, is_held: Callable[[str, str], bool] | None = None,
                 codec: AlertCodec | None = None, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.rules = rules
        self.is_held = is_held or (lambda branch, subject: False)
        self.codec = codec or AlertCodec()
        self.clock = clock
        self.facts = 0
        #: Bulk-access totals added ahead for the batch in hand: (fact id, category) → running total.
        self._pre: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------------------------------------
    def process_batch(self, facts: list[Fact]) -> list[Emit]:
        """The alerts to write for a batch of facts, in two round trips for the common case.

        The bulk-access counters of every access fact are added in one pipeline (Redis runs
        `appendfsync always`, so one fsync per batch instead of one per fact), and the conditions
        found for one alert id are merged before its state is updated once. The result is the same
        as `process` fact by fact: the pipeline runs in order, each fact gets its own running total.
        """
        adds: list[tuple[str, str, int, int]] = []
        keys: list[tuple[str, str]] = []
        for f in facts:
            if f.kind == "access" and f.action in ACCESS_ACTIONS:
                cfg = self.rules.rule(f.branch, "bulk_access")
                if cfg.get("enabled", True):
                    window_s = int(cfg.get("window_s", 86400))
                    start, _ = _window(f.ts_ms, window_s)
                    for category, n in (f.categories or {"other": f.count}).items():
                        adds.append((f"bulk:{f.branch}:{f.principal}:{category}:{start}", f.id, int(n),
                                     window_s + 86400))
                        keys.append((f.id, category))
        self._pre = dict(zip(keys, self.state.add_many(adds), strict=True)) if adds else {}
        try:
            conditions: dict[str, Condition] = {}
            for f in facts:
                for c in self._conditions(f):
                    conditions[c.id] = _combine(conditions.get(c.id), c)
        finally:
            self._pre = {}
        return self._merge(list(conditions.values()))

    def process(self, fact: Fact) -> list[Emit]:
        """The alerts to write for one fact (idempotent: a replayed fact changes no count)."""
        return self._merge(self._conditions(fact))

    def _conditions(self, fact: Fact) -> list[Condition]:
        self.facts += 1
        conditions: list[Condition] = []
        kind = fact.kind
        if kind == "principal":
            self.state.set_entity("principal", str(fact.principal), {"state": fact.attrs.get("state", "active"),
                                                                     "owner": fact.attrs.get("owner")}, fact.ts_ms)
            return []
        if kind == "transfer":
            self.state.set_entity("transfer", fact.branch, {k: fact.attrs.get(k) for k in
                                                            ("from_owner", "to_owner", "cutoff_ms", "state")},
                                  fact.ts_ms)
            return []
        if kind in ("access", "write", "delete", "denied") and fact.principal:
            conditions += self._principal(fact)
            conditions += self._transfer(fact)
        if kind == "access" and fact.action in ACCESS_ACTIONS:
            conditions += self._bulk(fact)
            conditions += self._first(fact)
            conditions += self._hours(fact)
        if kind == "write" and fact.columns:
            conditions += self._contact(fact)
        if kind == "transaction":
            conditions += self._transaction(fact)
        if kind == "delete":
            conditions += self._delete(fact)
        if kind in ("dlq", "integrity", "drift"):
            conditions += self._pipeline(fact)
        if kind == "anomaly":
            conditions += self._anomaly(fact)
        return conditions

    def _merge(self, conditions: list[Condition]) -> list[Emit]:
        out = []
        now = self.clock()
        for c in conditions:
            interval = float(self.rules.rule(c.branch, "delivery").get("min_update_interval_s", 60))
            version, emit, count, first, last, state = self.state.upsert_alert(
                c.id, c.static(), c.count, c.first_ms, c.last_ms, c.evidence, min_interval_s=interval, now=now)
            if emit:
                out.append(self._emit(c.static(), version, count, first, last, state))
        return out

    def _emit(self, static: dict[str, Any], version: int, count: int, first: int, last: int, state: str) -> Emit:
        record = self.codec.record(static, version=version, count=count, first_ms=first, last_ms=last, state=state,
                                   evidence=self.state.evidence(static["id"]), ts_ms=int(self.clock() * 1000))
        return Emit(static["id"], version, count, static["severity"], record, self.codec.encode(record))

    def emitted(self, emit: Emit) -> None:
        """Record that `emit` was acknowledged by Kafka (its version is not written again)."""
        self.state.mark_emitted(emit.id, emit.version, emit.count, self.clock())

    def flush(self, *, resolve_grace_s: float = 300.0) -> list[Emit]:
        """Alerts with an unwritten version (updates held back by the interval) and windows that ended more
        than `resolve_grace_s` ago (resolved). A periodic timer of the analyzer calls this."""
        out = []
        now = self.clock()
        for aid in self.state.open_alert_ids():
            st = self.state.alert_state(aid)
            if st is None:
                continue
            end = int(st["window_end_ms"])
            if end and end / 1000 + resolve_grace_s < now:
                version = self.state.resolve(aid)
                if version is not None:
                    out.append(self._emit(st, version, st["count"], st["first"], st["last"], "resolved"))
                continue
            if st["version"] > st["emitted"]:
                out.append(self._emit(st, st["version"], st["count"], st["first"], st["last"], st["state"]))
        return out

    # --- rules ----------------------------------------------------------------------------------------
    def _principal(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "principal")
        if not cfg.get("enabled", True) or not self.state.has_entities("principal"):
            return []  # without a registry (no principal facts yet) every principal would be unknown
        entity = self.state.entity("principal", str(f.principal))
        if entity is not None and entity.get("state", "active") == "active":
            return []
        rule = "unknown_principal" if entity is None else "disabled_principal"
        start, end = _window(f.ts_ms, cfg.get("window_s", 3600))
        total = self.state.add(f"{rule}:{f.branch}:{f.principal}:{start}", f.id, 1, cfg.get("window_s", 3600) + 86400)
        what = "not in the principal registry" if entity is None else "disabled"
        return [Condition(rule, cfg.get("severity", "high"), f.branch, f"principal={f.principal}", total, 1, start,
                          end, f.ts_ms, f.ts_ms, f"{f.action or f.kind} by a principal that is {what}",
                          "Block the principal's credentials now (identity provider), then find who used them: "
                          "check the evidence records and the terminal/session logs of that time.",
                          principal=f.principal, evidence=_ev(f))]

    def _transfer(self, f: Fact) -> list[Condition]:
        """After a transfer's cut-off: a principal of the former owner (`from_owner`), or of any organisation
        other than the owner from the cut-off on (`to_owner`), touching the branch is critical at once."""
        cfg = self.rules.rule(f.branch, "transfer")
        if not cfg.get("enabled", True):
            return []
        transfer = self.state.entity("transfer", f.branch) or {}
        from_owner, to_owner = transfer.get("from_owner"), transfer.get("to_owner")
        owner = (self.state.entity("principal", str(f.principal)) or {}).get("owner")
        # the policy engine's own verdict (issue 14: a denial by the cut-off policy) needs no registry
        by_policy = bool(set(f.policies) & set(cfg.get("policy_ids") or []))
        cutoff = int(transfer.get("cutoff_ms") or 0)
        if not by_policy:
            if not cutoff or f.ts_ms < cutoff or owner is None:
                return []
            if not ((from_owner and owner == from_owner) or (to_owner and owner != to_owner)):
                return []
        total = self.state.add(f"transfer:{f.branch}:{f.principal}:{cutoff}", f.id, f.count, 400 * 86400)
        return [Condition("access_after_transfer_cutoff", cfg.get("severity", "critical"), f.branch,
                          f"principal={f.principal}|cutoff={cutoff}", total, 1, cutoff, NO_END, f.ts_ms, f.ts_ms,
                          f"{f.action or f.kind} by a principal of {owner} after the branch's transfer cut-off "
                          f"(owner from the cut-off: {to_owner or '-'}, former owner: {from_owner or '-'})",
                          "Critical (PIPL Art. 22): revoke the principal's access to this branch at once, keep the "
                          "evidence records, and tell the new owner's DPO; check for an approved, time-boxed "
                          "exception before closing.", principal=f.principal, evidence=_ev(f))]

    def _anomaly(self, f: Fact) -> list[Condition]:
        """One of the sanitizer's anomalies, re-issued with a stable id: one alert per rule, table and day."""
        start, end = _window(f.ts_ms, 86400)
        rule = str(f.reason or "sanitizer_anomaly")
        total = self.state.add(f"anomaly:{f.branch}:{rule}:{f.table}:{start}", f.id, 1, 2 * 86400)
        what = str(f.attrs.get("what") or rule.replace("_", " "))
        return [Condition(rule, str(f.attrs.get("severity") or "medium"), f.branch, f"table={f.table}", total, 1,
                          start, end, f.ts_ms, f.ts_ms, f"{what} ({f.table})",
                          str(f.attrs.get("suggested_action") or "Read the anomaly's evidence records."),
                          principal=f.principal, counts={"occurrences": total}, evidence=_ev(f))]

    def _bulk(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "bulk_access")
        if not cfg.get("enabled", True):
            return []
        thresholds: dict[str, int] = dict(cfg.get("thresholds") or {})
        window_s = int(cfg.get("window_s", 86400))
        start, end = _window(f.ts_ms, window_s)
        out = []
        for category, n in (f.categories or {"other": f.count}).items():
            limit = int(thresholds.get(category, thresholds.get("other", 2500)))
            total = self._pre.get((f.id, category))
            if total is None:
                total = self.state.add(f"bulk:{f.branch}:{f.principal}:{category}:{start}", f.id, int(n),
                                       window_s + 86400)
            if total > limit:
                out.append(Condition(
                    "bulk_access", cfg.get("severity", "high"), f.branch,
                    f"principal={f.principal}|category={category}", total, limit, start, end, f.ts_ms, f.ts_ms,
                    f"{total} {category} records revealed/searched/exported by one principal in the window "
                    f"(limit {limit})",
                    "Ask the principal's manager whether a case or ticket justifies the volume; if not, suspend "
                    "the principal and preserve the evidence records (PIPL; 法释〔2017〕10号 Art. 5 thresholds).",
                    principal=f.principal, counts={category: total}, evidence=_ev(f)))
        return out

    def _first(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "first_access")
        if not cfg.get("enabled", True):
            return []
        out = []
        sev = cfg.get("severity", "medium")
        # a new deployment learns who uses the branch for `learn_s` from its first access fact before alerting
        start = self.state.first_time(f"learn:{f.branch}", f.ts_ms)
        learning = f.ts_ms < start + int(cfg.get("learn_s", 0)) * 1000
        if self.state.claim_first(f"branch:{f.branch}", str(f.principal), f.id) and not learning:
            out.append(Condition("first_access_branch", sev, f.branch, f"principal={f.principal}", 1, 1, 0, NO_END,
                                 f.ts_ms, f.ts_ms, "first access of this principal to the branch",
                                 "Confirm with the branch manager that the principal's access to this branch is "
                                 "expected (new staff, a case); resolve the alert if so.",
                                 principal=f.principal, evidence=_ev(f)))
        watched = set(cfg.get("categories") or [])
        for category in sorted(set(f.categories) & watched):
            if self.state.claim_first(f"category:{f.branch}", f"{f.principal}|{category}", f.id) and not learning:
                out.append(Condition("first_access_category", sev, f.branch,
                                     f"principal={f.principal}|category={category}", 1, 1, 0, NO_END, f.ts_ms, f.ts_ms,
                                     f"first access of this principal to {category} data",
                                     "Check that the principal's role needs this data category; if not, narrow "
                                     "its policy.", principal=f.principal, evidence=_ev(f)))
        return out

    def _hours(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "business_hours")
        if not cfg.get("enabled", True):
            return []
        tz = ZoneInfo(str(self.rules.for_branch(f.branch).get("timezone", "UTC")))
        local = datetime.fromtimestamp(f.ts_ms / 1000, UTC).astimezone(tz)
        start_h, end_h = str(cfg.get("start", "09:00")), str(cfg.get("end", "17:00"))
        hhmm = local.strftime("%H:%M")
        inside = (local.isoweekday() in set(cfg.get("weekdays") or [1, 2, 3, 4, 5])
                  and local.strftime("%Y-%m-%d") not in set(cfg.get("holidays") or [])
                  and start_h <= hhmm < end_h)
        if inside:
            return []
        # the window is the branch's local day
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        start = int(day.timestamp() * 1000)
        end = start + DAY_MS
        total = self.state.add(f"hours:{f.branch}:{f.principal}:{start}", f.id, f.count, 2 * 86400)
        return [Condition("outside_business_hours", cfg.get("severity", "medium"), f.branch,
                          f"principal={f.principal}", total, 1, start, end, f.ts_ms, f.ts_ms,
                          f"{f.action} of customer data at {hhmm} {local.tzname()} (branch hours {start_h}-{end_h}, "
                          f"{local.strftime('%a')})",
                          "Check with the principal's manager whether overtime or an incident explains it; if "
                          "not, suspend the principal and review what was read.",
                          principal=f.principal, evidence=_ev(f))]

    def _contact(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "contact_takeover")
        if not cfg.get("enabled", True) or not f.subject:
            return []
        window_s = int(cfg.get("window_s", 86400))
        start, end = _window(f.ts_ms, window_s)
        ttl = window_s + 86400
        out = []
        within_s = int(cfg.get("transaction_within_s", 86400))
        self.state.add_time(f"contact:{f.branch}:{f.subject}", f.id, f.ts_ms, within_s + 86400)
        # the transaction's fact may be read first (another topic, another partition, a backlog): the change
        # looks forward for every large transaction it precedes within the window
        txns = self.state.times_between(f"large-txn:{f.branch}:{f.subject}", f.ts_ms, f.ts_ms + within_s * 1000)
        if txns:
            out.append(self._takeover(f, f.ts_ms, txns, within_s * 1000))
        sev = cfg.get("severity", "high")
        if f.principal:
            limit = int(cfg.get("operator_changes", 5))
            n = self.state.distinct(f"contact-op:{f.branch}:{f.principal}:{start}", f.subject, ttl)
            if n > limit:
                out.append(Condition("contact_changes_by_one_operator", sev, f.branch, f"principal={f.principal}",
                                     n, limit, start, end, f.ts_ms, f.ts_ms,
                                     f"one operator changed the contact details of {n} customers (limit {limit})",
                                     "Call a sample of the customers on their previously known number; freeze "
                                     "online-banking bindings made after these changes; suspend the operator "
                                     "pending review.", principal=f.principal, counts={"customers": n},
                                     evidence=_ev(f)))
        limit = int(cfg.get("same_token_customers", 3))
        for column, token in sorted(f.tokens.items()):
            n = self.state.distinct(f"contact-token:{f.branch}:{column}:{token}:{start}", f.subject, ttl)
            if n >= limit:
                out.append(Condition("contact_same_value_many_customers", sev, f.branch,
                                     f"column={column}|token={token}", n, limit, start, end, f.ts_ms, f.ts_ms,
                                     f"{n} customers' {column} changed to the same value (blind-index token)",
                                     "The same contact value on several customers is a takeover pattern (one "
                                     "phone receiving their OTPs): contact the customers, block the bindings, "
                                     "check which operator made the changes (evidence).",
                                     principal=f.principal, counts={"customers": n},
                                     evidence=[("token", f"{column}:{token}"), *_ev(f)]))
        return out

    def _transaction(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "contact_takeover")
        if not cfg.get("enabled", True) or not f.subject:
            return []
        if str(f.attrs.get("amount_band")) not in set(cfg.get("large_bands") or ["large"]):
            return []
        within = int(cfg.get("transaction_within_s", 86400)) * 1000
        self.state.add_time(f"large-txn:{f.branch}:{f.subject}", f.id, f.ts_ms, within // 1000 + 86400)
        # every change of the customer's contact details in the window before it, not only the latest one read:
        # a change, a transaction and a revert read out of order (a backlog, a restart) must still pair up
        out = []
        for changed in self.state.times_between(f"contact:{f.branch}:{f.subject}", f.ts_ms - within, f.ts_ms):
            txns = self.state.times_between(f"large-txn:{f.branch}:{f.subject}", changed, changed + within)
            out.append(self._takeover(f, changed, txns, within))
        return out

    def _takeover(self, f: Fact, changed: int, txns: list[int], within: int) -> Condition:
        """The alert of the large transactions `txns` (times, oldest first) on a customer whose contact details
        changed at `changed`: one per subject and change, counting the transactions in the window, whichever of
        the facts the analyzer reads first (the same alerts in any order)."""
        return Condition("contact_change_then_large_transaction", "critical", f.branch, f"subject={f.subject}",
                         len(txns), 1, changed, changed + within, changed, txns[-1],
                         f"a large transaction {round((txns[0] - changed) / 3_600_000, 1)} h after the customer's "
                         "contact details changed",
                         "Hold the transaction if still possible and call the customer on the number known before "
                         "the change; report as suspected account takeover.",
                         evidence=[("subject", str(f.subject)), *_ev(f)])

    def _delete(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "deletion")
        if not cfg.get("enabled", True):
            return []
        out = []
        window_s = int(cfg.get("window_s", 3600))
        start, end = _window(f.ts_ms, window_s)
        table = f.table or "?"
        if f.decision != "unexplained":
            limit = int(cfg.get("spike", 50))
            total = self.state.add(f"delete:{f.branch}:{table}:{start}", f.id, f.count, window_s + 86400)
            if total > limit:
                out.append(Condition("deletion_spike", cfg.get("severity", "high"), f.branch, f"table={table}", total,
                                     limit, start, end, f.ts_ms, f.ts_ms,
                                     f"{total} deletes on {table} in the window (limit {limit})",
                                     "Find who deletes (evidence records, database logs); if it is not an approved "
                                     "purge, stop it and restore from backup: deletions must be triggered, "
                                     "justified and recorded (PIPL Art. 47).",
                                     counts={"deletes": total}, evidence=_ev(f)))
        if cfg.get("unexplained", True) and (f.decision == "unexplained" or f.attrs.get("explained") is False):
            total = self.state.add(f"unexplained:{f.branch}:{table}:{start}", f.id, f.count, window_s + 86400)
            out.append(Condition("unexplained_delete", cfg.get("severity", "high"), f.branch, f"table={table}", total,
                                 1, start, end, f.ts_ms, f.ts_ms,
                                 f"{total} deletes of customers' rows on {table} that no erasure request, ticket or "
                                 "catalog meaning explains",
                                 "Ask who deleted and under which request; attach the deletion ticket, or restore the "
                                 "rows (possible evidence destruction).", principal=f.principal,
                                 counts={"deletes": total}, evidence=_ev(f)))
        if f.subject and self.is_held(f.branch, f.subject):
            out.append(Condition("delete_under_legal_hold", str(cfg.get("legal_hold_severity", "critical")), f.branch,
                                 f"subject={f.subject}", 1, 1, start, NO_END, f.ts_ms, f.ts_ms,
                                 "a customer under legal hold was deleted in the branch database",
                                 "Restore the customer's rows from backup now and find who deleted them; records "
                                 "under AML or legal hold must not be deleted (the guard kept its keys: held "
                                 "customers are never shredded).", principal=f.principal,
                                 evidence=[("subject", f.subject), *_ev(f)]))
        return out

    def _pipeline(self, f: Fact) -> list[Condition]:
        cfg = self.rules.rule(f.branch, "pipeline")
        if not cfg.get("enabled", True):
            return []
        window_s = int(cfg.get("window_s", 300))
        start, end = _window(f.ts_ms, window_s)
        if f.kind == "drift":
            column = f.columns[0] if f.columns else "?"
            severity = str(f.attrs.get("severity") or "medium")
            return [Condition("schema_drift", severity, f.branch, f"table={f.table}|column={column}", 1, 1, 0, NO_END,
                              f.ts_ms, f.ts_ms, f"personal data in {f.table}.{column}, a column the catalog doesn't "
                              "know (sealed, fail closed)",
                              f"Classify {f.table}.{column} in schemas/catalog.toml (class, category, action) and "
                              "restart the guard.", evidence=_ev(f))]
        if f.kind == "integrity":
            total = self.state.add(f"integrity:{f.branch}:{f.reason}:{start}", f.id, 1, window_s + 86400)
            return [Condition("integrity_failure", cfg.get("severity", "high"), f.branch, f"reason={f.reason}", total,
                              1, start, end, f.ts_ms, f.ts_ms, f"{total} × {f.reason}",
                              "Decryption, integrity or audit-chain failures mean tampering, a wrong key or a bug: "
                              "keep the records (DLQ, evidence), check the key store and the producer.",
                              counts={str(f.reason): total}, evidence=_ev(f))]
        limit = int(cfg.get("dlq_spike", 10))
        total = self.state.add(f"dlq:{f.branch}:{start}", f.id, 1, window_s + 86400)
        if total <= limit:
            return []
        return [Condition("dlq_spike", cfg.get("severity", "high"), f.branch, "dlq", total, limit, start, end, f.ts_ms,
                          f.ts_ms, f"{total} records to the DLQ in the window (limit {limit}; latest {f.reason})",
                          "Read the DLQ reasons (guard.dlq); fix the producer or classify the table, then re-send.",
                          counts={"dlq": total}, evidence=_ev(f))]


def _combine(old: Condition | None, new: Condition) -> Condition:
    """Two findings of one alert in a batch: the higher count, the wider time span, the evidence of both."""
    if old is None:
        return new
    keep = new if new.count >= old.count else old
    keep.first_ms, keep.last_ms = min(old.first_ms, new.first_ms), max(old.last_ms, new.last_ms)
    keep.evidence = list(dict.fromkeys([*old.evidence, *new.evidence]))[:20]
    return keep


def _ev(f: Fact) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("record", f.ref or f.id)]
    if f.subject:
        out.append(("subject", f.subject))
    return out
