"""The emit stage: the records one change event produces, as bytes ready for Kafka.

`RecordBuilder` writes the sanitized change (Avro), the per-event audit record (from templates cached per
partition, plan, op and shape), schema-drift and erased-subject anomalies, DLQ records (the input sealed
under the tenant's quarantine key, never in plaintext) and deletion confirmations. It decides nothing:
what an event becomes was settled by the plan and protect stages; this stage only writes it down.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from guard.audit.chain import CHECKPOINT_HEADER
from guard.audit.note import Signer
from guard.cdc.envelope import ChangeEvent
from guard.classify.plans import TablePlan
from guard.config import Settings
from guard.keys.manager import KeyManager
from guard.records.codec import AvroCodec
from guard.records.encoders import AuditTemplate, encode_change

#: The audit record's format (its `v`). 2: a change whose write the access policy decided carries the
#: decision in its own record's `reason` (`write_reason`; `guard.records.codec.write_decision_of` reads both
#: formats). 1 (before): the decision was a second record at the same source offset.
FORMAT_VERSION = 2
#: Largest input copied (sealed) into a DLQ record; Kafka's default message limit is 1 MB.
QUARANTINE_MAX_BYTES = 256 * 1024


@dataclass(slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, str | bytes | None]] | None = None
    #: The record's timestamp (ms); None: the input's (the runner's default).
    timestamp: int | None = None


class RecordBuilder:
    """Builds the sanitized, audit, anomaly, DLQ and deletion records of one branch's worker."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyManager,
        *,
        registry: Any = None,
        alert_once: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.branch = settings.branch
        self.sanitized_codec = AvroCodec("sanitized_change", registry=registry)
        self.audit_codec = AvroCodec("audit_record", registry=registry)
        self._alert_once = LocalOnce() if alert_once is None else RememberedOnce(alert_once)
        self._clock = clock
        self._prefix_len = len(settings.raw_topic_prefix) + 1
        #: The trace id of the event in hand (the sanitizer sets it per event; audit records carry it).
        self.trace_id: str | None = None
        self._audit_templates: dict[tuple[Any, ...], tuple[AuditTemplate, bytes]] = {}
        #: Signs deletion confirmations (`guard.audit.note`); the worker and `guard erase` set it.
        self.signer: Signer | None = None

    def alert_once(self, key: str) -> bool:
        """True for the first alert of `key` (across workers when the runner shares the key store's)."""
        return self._alert_once(key)

    def change(
        self,
        event: ChangeEvent,
        subject: str | None,
        before: bytes | None,
        after: bytes | None,
        unclassified: list[str],
        *,
        before_subject: str | None = None,
    ) -> bytes:
        """The sanitized change; `before_subject` names the before image's subject when it differs."""
        return self.sanitized_codec.header + encode_change(
            op=event.op, table=event.schema_table, branch=self.branch, db=event.database, ts_ms=event.ts_ms,
            source_ts_ms=event.source_ts_ms, position=event.position, subject=subject, before=before,
            after=after, unclassified=unclassified, before_subject=before_subject)

    def audit_for_plan(self, topic: str, partition: int, offset: int, plan: TablePlan, op: str, subject: str,
                       decision: str, images: int, sealed: bool, write: str | None = None,
                       also_unclassified: tuple[str, ...] = ()) -> OutRecord:
        """The per-event audit record, from a template cached per (partition, plan, op, decision, shape);
        `write` is the change's write decision (`write_reason`), carried in the record's `reason`;
        `also_unclassified`: columns outside the catalog that only the other image has (an update's before)."""
        template, record_key = self.audit_template(topic, partition, plan, op, decision, images, sealed,
                                                   also_unclassified)
        value = self.audit_codec.header + template.encode(int(self._clock() * 1000), offset, subject, self.trace_id,
                                                          write)
        return OutRecord(self.settings.audit_topic, record_key, value)

    def audit_template(self, topic: str, partition: int, plan: TablePlan, op: str, decision: str, images: int,
                       sealed: bool, also_unclassified: tuple[str, ...] = ()) -> tuple[AuditTemplate, bytes]:
        """(template, record key) of the audit records of one (partition, plan, op, decision, shape)."""
        key = (topic, partition, id(plan), op, decision, images, sealed, also_unclassified)
        cached = self._audit_templates.get(key)
        if cached is None:
            template = AuditTemplate(worker=self.settings.worker_id, branch=self.branch, source_topic=topic,
                                     source_partition=partition, table=plan.schema_table, op=op,
                                     decision=decision, reason=None, classes=dict(plan.class_counts),
                                     actions=_action_counts(plan, images, sealed),
                                     unclassified=[*(p.name for p in plan.unclassified), *also_unclassified],
                                     version=FORMAT_VERSION)
            if len(self._audit_templates) > 50_000:
                self._audit_templates.clear()
            cached = self._audit_templates[key] = (template, f"{topic}:{partition}".encode())
        return cached

    def write_alert(self, rule: str, table: str, source: tuple[str, int, int],
                    decision: Mapping[str, Any]) -> OutRecord:
        """An anomaly for a write the policy did not allow (`write_denied`) or that names nobody
        (`write_unattributed`): it happened in the branch database and can't be undone, so someone must look."""
        return self.anomaly(rule, "high", table, None, {
            "source": {"topic": source[0], "partition": source[1], "offset": source[2]},
            "principal": decision.get("principal"), "action": decision.get("action"),
            "policies": decision.get("policies", []), "reason": decision.get("reason"),
            "what": "a change was written in the branch database " + (
                "by a principal the access policy does not allow to" if rule == "write_denied" else
                "without a principal the guard can attribute it to (`reason` says why: none named, a name of "
                "the wrong form, several in one transaction, or a delete's attribution that never arrived)"),
            "suggested_action": "check who made the change and why; the sanitized record carries the decision "
                                "in its bg-policy header (docs/policy.md)"})

    # ------------------------------------------------------------------------------------------
    def audit(
        self,
        topic: str,
        partition: int,
        offset: int,
        table: str | None,
        op: str | None,
        subject: str | None,
        decision: str,
        reason: str | None,
        classes: Mapping[str, int],
        actions: Mapping[str, int],
        unclassified: list[str] | None = None,
    ) -> OutRecord:
        record = {
            "v": FORMAT_VERSION,
            "ts_ms": int(self._clock() * 1000),
            "worker": self.settings.worker_id,
            "branch": self.branch,
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "table": table,
            "op": op,
            "subject": subject,
            "decision": decision,
            "reason": reason,
            "classes": dict(classes),
            "actions": dict(actions),
            "unclassified": unclassified or [],
            "trace_id": self.trace_id,
        }
        return OutRecord(self.settings.audit_topic, f"{topic}:{partition}".encode(), self.audit_codec.encode(record))

    def checkpoint(self, chain: str, size: int, note: str) -> OutRecord:
        """A chain's signed checkpoint as an audit record (decision and op ``checkpoint``, the note as
        reason), so every record of the audit topic still decodes with the one audit schema."""
        rec = self.audit(chain, -1, size, None, "checkpoint", None, "checkpoint", note, {}, {})
        rec.key = chain.encode()
        rec.headers = [(CHECKPOINT_HEADER, chain.encode())]
        return rec

    def dlq(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        detail: str,
    ) -> list[OutRecord]:
        """A DLQ record: the reason, where the input was, and the input sealed (never plaintext).

        Inputs larger than `QUARANTINE_MAX_BYTES` are not copied (the DLQ record would exceed Kafka's
        message size); they stay at their source offset until the raw topic's retention ends. A write for
        an erased data subject (`subject_erased`) is never copied either: the quarantine key is the
        tenant's, which no erasure destroys, so a copy would keep the erased customer readable. Only its
        position, reason and keyed fingerprints (HMAC-SHA256 under the guard's DLQ hash key) are kept.
        """
        aad = f"bg-dlq|{topic}|{partition}|{offset}".encode()
        erased = reason == "subject_erased"
        copy = value is not None and len(value) <= QUARANTINE_MAX_BYTES and not erased
        if erased:
            note = ("not copied: a write for an erased data subject; it stays at the source offset until the raw "
                    "topic's retention ends")
        elif copy or value is None:
            note = "AES-256-GCM under the tenant's quarantine key; associated data = aad + '|key' / '|value'"
        else:
            note = (f"input larger than {QUARANTINE_MAX_BYTES} bytes: not copied; it stays at the source offset "
                    "until the raw topic's retention ends")
        fingerprint = self.keys.dlq_hash.hexdigest
        # The DLQ's Kafka key is the same keyed fingerprint of the input's key, never the raw key.
        dlq_key = None if key is None else fingerprint("bg-dlq-key", key)
        body = {
            "type": "dlq",
            "reason": reason,
            "detail": detail,
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "branch": self.branch,
            "worker": self.settings.worker_id,
            "at_ms": int(self._clock() * 1000),
            "value_bytes": None if value is None else len(value),
            "value_hmac": None if value is None else fingerprint("bg-dlq-value", value),
            "key_hmac": dlq_key,
            "quarantine": {
                "aad": aad.decode(),
                "key": None if key is None or erased else _b64(self.keys.quarantine.seal(key, aad + b"|key")),
                "value": _b64(self.keys.quarantine.seal(value, aad + b"|value")) if copy and value else None,
                "note": note,
            },
            "action": "fix the producer (or classify the table in schemas/catalog.toml) and re-send the change; "
                      "the quarantined input can be opened with the tenant's quarantine key",
        }
        records = [
            OutRecord(self.settings.dlq_topic, None if dlq_key is None else dlq_key.encode(), orjson.dumps(body)),
            self.audit(topic, partition, offset, topic[self._prefix_len:], None, None, "dlq", reason, {}, {}),
        ]
        if reason == "subject_erased":
            records.append(self.anomaly("write_for_erased_subject", "high", topic[self._prefix_len:], None, {
                "source": body["source"],
                "what": "a create/update arrived for a data subject whose key was crypto-shredded",
                "suggested_action": "check why the branch database still writes this customer's data after erasure",
            }))
        return records

    def anomaly(self, rule: str, severity: str, table: str, column: str | None, evidence: dict[str, Any]) -> OutRecord:
        alert = {
            "type": "anomaly",
            "id": str(uuid.uuid4()),
            "rule": rule,
            "severity": severity,
            "branch": self.branch,
            "table": table,
            "column": column,
            "at_ms": int(self._clock() * 1000),
            "worker": self.settings.worker_id,
            **evidence,
        }
        return OutRecord(self.settings.anomalies_topic, f"{rule}:{table}:{column}".encode(), orjson.dumps(alert))

    def band_fact(self, source: tuple[str, int, int], table: str, column: str, subject: str, band: str,
                  ts_ms: int) -> OutRecord:
        """A `transaction` fact for the anomaly analyzers (guard/anomaly/facts.py `Fact`, JSON): a new row of
        `table` whose `column` reached `band`. The band's name only, never the value; keyed by the subject
        (a customer's facts stay in order); its id is the source position, the same on every replay."""
        topic, partition, offset = source
        where = f"{topic}:{partition}:{offset}"
        fact = {"v": 1, "kind": "transaction", "id": f"{where}:band", "ts_ms": ts_ms, "branch": self.branch,
                "table": table, "subject": subject, "ref": where, "columns": [column],
                "attrs": {"amount_band": band, "column": column}}
        return OutRecord(self.settings.facts_topic, subject.encode(), orjson.dumps(fact))

    def rows_without_subject(self, plan: TablePlan, topic: str) -> list[OutRecord]:
        """An anomaly (once per table) when rows name no data subject: each is sealed under its own key."""
        if not self._alert_once(f"no_subject:{self.branch}:{plan.schema_table}"):
            return []
        return [self.anomaly("rows_without_data_subject", "medium", plan.schema_table, plan.subject_column, {
            "what": "rows whose subject column is null, unusable or absent: each is sealed under a per-row key "
                    "(of branch, table and row key) that its delete or retention erases",
            "suggested_action": f"give {plan.schema_table} a subject column in schemas/catalog.toml, or check why "
                                "its rows have no customer",
            "raw_topic": topic,
        })]

    def drift_alerts(self, plan: TablePlan, topic: str) -> list[OutRecord]:
        alerts = []
        for policy in plan.unclassified:
            if not self._alert_once(f"drift:{plan.schema_table}:{policy.name}"):
                continue
            alerts.append(self.anomaly("schema_drift_unclassified_column", "medium" if policy.category == "unknown"
                                       else "high", plan.schema_table, policy.name, {
                "detected": policy.detected_by,
                "data_class": policy.data_class,
                "category": policy.category,
                "action_taken": f"{policy.action.value} (fail closed: the column is not in the catalog)",
                "suggested_action": f"classify {plan.schema_table}.{policy.name} in schemas/catalog.toml "
                                    "(class, category, action) and restart the guard",
                "raw_topic": topic,
            }))
        return alerts

    # ------------------------------------------------------------------------------------------
    def deletion(
        self,
        subject: str,
        *,
        confirmation_id: str,
        outcome: str,
        held: bool,
        destroyed: int,
        known_topics: list[str],
        trigger: str,
        reason_code: str,
        reason: str,
        by: str,
        source: tuple[str, int, int] | None,
        now_ms: int,
        remains: list[dict[str, Any]] | None = None,
    ) -> list[OutRecord]:
        """The deletion confirmation of an erasure (or a hold) and its audit record.

        `outcome`: `shredded`, `no_keys` (no key existed: nothing was sealed for the subject) or
        `held_storage_only`. The confirmation's `remains` lists every place the subject's data can still be,
        in what form and until when, so the confirmation claims no more than crypto-shredding achieves:
        `remains` given here (`what_remains`: per sanitized topic, from its configuration, with the
        retention or compaction date and the tombstones written) replaces the generic per-topic entries,
        and the places outside the sanitized topics (audit, DLQ, raw topics, key store, caches, branch DB)
        are always added.
        """
        s = self.settings
        if held:
            method = "none: subject under legal hold; processing limited to storage (docs/keys.md, Legal hold)"
        elif destroyed:
            method = ("crypto-shredding: every version of the data subject's AES-256 key destroyed in the shared "
                      "key store; the sealed fields become unreadable in every sanitized topic and every copy of one "
                      "(key-store backups taken before the shred keep the wrapped key: see remains)")
        else:
            method = ("none needed: the guard never held a key for this data subject, so nothing was sealed "
                      "under one; the subject is marked erased so no key is ever created for it")
        confirmation = {
            "type": "deletion_confirmation",
            "id": confirmation_id,
            "subject": subject,
            "branch": self.branch,
            "tenant": self.keys.tenant,
            "outcome": outcome,
            "trigger": trigger,
            "reason_code": reason_code,
            "reason": reason,
            "law": "PIPL Art. 47" + (" para. 2 (retention required by law: storage only)" if held else ""),
            "method": method,
            "keys_destroyed": [f"dek/{self.branch}/{subject}/v{v}" for v in range(1, destroyed + 1)],
            "unreadable_topics": known_topics if destroyed and not held else [],
            "remains": [] if held else _remains(s, known_topics, destroyed, remains),
            "at_ms": now_ms,
            "by": by,
            "source": None if source is None else {"topic": source[0], "partition": source[1], "offset": source[2]},
            "audit": {"topic": s.audit_topic, "decision": outcome},
        }
        if self.signer is not None:
            confirmation = self.signer.sign_confirmation(confirmation)
        body = orjson.dumps(confirmation)
        audit_source = source or ("erase", 0, 0)
        audit = self.audit(audit_source[0], audit_source[1], audit_source[2], None, "erase", subject,
                           "held" if held else outcome, f"{reason_code}; confirmation {confirmation_id}; "
                           f"sha256 {hashlib.sha256(body).hexdigest()}", {}, {"keys_destroyed": destroyed})
        audit.timestamp = now_ms
        return [OutRecord(s.deletions_topic, subject.encode(), body, timestamp=now_ms), audit]


def _remains(s: Settings, topics: list[str], destroyed: int,
             per_topic: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Where an erased subject's data can remain after the shred, in what form, until when.

    `per_topic`: the sanitized topics' entries with their dates (`what_remains`); without them (no topic
    configuration at hand), one generic entry per topic.
    """
    sealed = "sealed fields unreadable (key destroyed); " if destroyed else ""
    return [
        *(per_topic if per_topic is not None else (
            {"where": t, "what": sealed + "display masks, blind indexes and the subject token remain "
             "(pseudonymised, PIPL Art. 73)", "until": "the topic's retention or compaction"} for t in topics)),
        {"where": s.audit_topic, "what": "the subject token and the decisions taken, never a value",
         "until": "the audit topic's retention"},
        {"where": s.dlq_topic, "what": "inputs of this subject that failed before the erasure, sealed under the "
         "tenant's quarantine key (not covered by the shred); after the erasure only positions, reasons and "
         "keyed hashes", "until": "the DLQ topic's retention"},
        {"where": f"{s.raw_topic_prefix}.* (raw CDC topics)", "what": "the branch database's changes in plaintext "
         "(guard-only topics)", "until": "the raw topics' retention"},
        {"where": "key store append-only file", "what": "the wrapped key (useless without the branch key)"
         if destroyed else "nothing", "until": "the append-only-file rewrite the shred schedules completes (the "
         f"worker starts it {s.aof_compaction_delay_s:.0f} s after the shred at most, later only while a rewrite "
         "already running has to finish first or the key store fails; if the worker crashed first, another "
         "worker does it, at its start or next maintenance plus that delay)"},
        {"where": "key store backups and RDB snapshots", "what": "the wrapped key if taken before the shred",
         "until": "the backups' retention"},
        {"where": "running workers' caches", "what": "the unwrapped key and memoised protected forms",
         "until": f"at most {s.key_cache_ttl:.0f} s (invalidated at once when notified)"},
        {"where": "the branch database", "what": "whatever the branch system keeps", "until": "not the guard's "
         "to delete"},
    ]


def _action_counts(plan: TablePlan, images: int, sealed: bool) -> dict[str, int]:
    counts = {
        "sealed": len(plan.sealed) * images if sealed else 0,
        "masked": len(plan.masks) * images if sealed else 0,
        "index": len(plan.index) * images if sealed else 0,
        "hashed": len(plan.hashed) * images,
        "dropped": len(plan.dropped) * images,
    }
    return {k: v for k, v in counts.items() if v}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class LocalOnce:
    """Deduplicates alerts within one process (the runner passes a Redis-backed one across workers)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class RememberedOnce:
    """A shared alert deduplication (`RedisKeyStore.alert_once`: the first caller across workers within its
    24-hour TTL alerts) asked at most once per `hold_s` per key by this process.

    Why: the rules that alert once per table or column (a schema drift, rows without a data subject, a
    root delete without a rule) run for every event that meets them, and each asked the key store: a
    round trip per event for a table whose rows name no customer, three per logical message with the
    policy checks off (`guard bench`'s `guard-nopolicy` trial). An answer is kept for `hold_s` (an hour),
    then the key store is asked again, so a repeated alert comes at most that much later than the shared
    TTL lets it. At most `limit` keys are kept (one per table or column met; forgotten all at once beyond).
    """

    def __init__(self, shared: Callable[[str], bool], *, hold_s: float = 3_600.0,
                 clock: Callable[[], float] = time.monotonic, limit: int = 10_000) -> None:
        self._shared, self._hold_s, self._clock, self._limit = shared, hold_s, clock, limit
        self._answered: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = self._clock()
        until = self._answered.get(key)
        if until is not None and until > now:
            return False  # asked within `hold_s`: alerted then, by this worker or another
        first = self._shared(key)
        if len(self._answered) >= self._limit:
            self._answered.clear()
        self._answered[key] = now + self._hold_s
        return first
