"""The sanitizer's transform: one raw Debezium record in, the records to produce out.

This module knows nothing about Kafka clients or transactions (see `guard.kafka.runner`); it is a pure function
of the input record plus the key manager and catalog, so the offline `guard sanitize` command and the
live pipeline run exactly the same code. (`run_native` is handed the runner's `produce` function so the
native path can produce runs of a batch itself; it still never sees a client or a transaction.)

Per event the work is: decode the envelope, look up the cached table plan, resolve the data subject's key
(cached), and per image: copy clear columns, compute display masks and blind indexes, and seal every
protected column in **one** AES-256-GCM call whose associated data binds the ciphertext to its topic,
table, row key, image, data subject, field list and key version.

Failure policy (fail closed): anything that can't be decoded or protected goes to the DLQ with a reason
code and the raw value sealed under the tenant's quarantine key, never in plaintext. Only an unreachable
key store is *not* a per-record failure: `KeyUnavailableError` propagates so the runner aborts the
transaction and retries the batch once the store is back, instead of flooding the DLQ.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from guard.cdc.envelope import MAX_VALUE_BYTES, ChangeEvent, decode_value
from guard.classify.catalog import Catalog
from guard.classify.plans import Classifier, TablePlan
from guard.config import Settings
from guard.errors import DecodeError, KeyShreddedError, KeyUnavailableError
from guard.keys.manager import KeyManager
from guard.keys.primitives import Aead
from guard.protect.aad import ImageAad
from guard.protect.fastpath import new_fast_path, use_native
from guard.protect.masking import mask
from guard.records.codec import AvroCodec
from guard.records.encoders import AuditTemplate, ImageWriter, encode_change

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: A worker re-records a (subject, topic) pair's activity in the key store at most this often; expiries
#: are padded by the same amount, so a retention sweep is never early, at most this much late.
ACTIVITY_REFRESH_S = 3600
#: Largest input copied (sealed) into a DLQ record; Kafka's default message limit is 1 MB.
QUARANTINE_MAX_BYTES = 256 * 1024
_SCALARS = (str, int, float, bool, type(None))


@dataclass(slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, str | bytes | None]] | None = None


@dataclass(slots=True)
class NativeRun:
    """What `Sanitizer.run_native` did: `records[start:end]` are sanitized and their outputs produced."""

    end: int
    #: (topic, partition, offset) of the last record of each partition in the run.
    last: list[tuple[str, int, int]]
    #: (table, class counts, events): what the runner's counters add, per table plan.
    shapes: list[tuple[str, Mapping[str, int], int]]
    #: The inputs' timestamps (ms), for the latency metrics.
    timestamps: list[int]
    #: Records produced per event: sanitized and audit.
    RECORDS_PER_EVENT: ClassVar[int] = 2


@dataclass(slots=True)
class Outcome:
    """What one input record produced, plus the facts the runner turns into metrics."""

    records: list[OutRecord]
    decision: str
    table: str | None = None
    classes: Mapping[str, int] = field(default_factory=dict)
    dlq_reason: str | None = None


class Sanitizer:
    """Transforms raw change records of one branch into sanitized, audit, alert and DLQ records."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyManager,
        catalog: Catalog,
        *,
        registry: Any = None,
        alert_once: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.branch = settings.branch
        self.classifier = Classifier(catalog)
        self.sanitized_codec = AvroCodec("sanitized_change", registry=registry)
        self.audit_codec = AvroCodec("audit_record", registry=registry)
        self._alert_once = alert_once or _LocalOnce()
        self._clock = clock
        self._prefix_len = len(settings.raw_topic_prefix) + 1
        self._key_cache: dict[tuple[str, bytes], bytes] = {}
        #: (subject, sanitized topic) → retention seconds, for the pairs seen since the last commit: where
        #: each subject's ciphertexts went (deletion confirmations) and when its data expires (retention).
        self.subject_activity: dict[tuple[str, str], int] = {}
        #: Whether a delete of a subject's root row erases the subject (False for offline runs).
        self.act_on_deletes = True
        self._trace_id: str | None = None
        self._erased_at: dict[str, int] = {}
        self._subject_tokens: dict[Any, str] = {}
        self._writers: dict[int, ImageWriter] = {}
        #: Decoded ahead: (the value bytes object, its ChangeEvent or parsed JSON). An entry is only used
        #: for that very bytes object, so a stale entry can never stand in for another record's value.
        self._predecoded: dict[tuple[str, int, int], tuple[bytes | None, Any]] = {}
        self._activity_recorded: dict[tuple[str, str], float] = {}
        self._audit_templates: dict[tuple[Any, ...], tuple[AuditTemplate, bytes]] = {}
        self._aad = ImageAad()
        self._value_caches_since = clock()
        #: Plans registered with the native path, by id (it reports which one it used).
        self._fast_plans: dict[int, TablePlan] = {}
        self._fast: Any = None
        #: Native path: the batch `prefetch` was given, until a key miss loads its keys (`_load_keys_from`).
        self._batch: Sequence[tuple[str, int, int, bytes | None]] = ()
        self._out_topics: dict[str, str] = {}
        if use_native(settings.hot_path):
            self._fast = new_fast_path(
                branch=self.branch, sanitized_header=self.sanitized_codec.header,
                audit_header=self.audit_codec.header, subject_of=self._subject_for,
                aead_for=self._cached_aead, audit_parts=self._fast_audit_parts, dumps=orjson.dumps,
                loads=orjson.loads, mask=mask, token=keys.index.token, keyed_hash=keys.keyed_hash.digest,
                max_value_bytes=MAX_VALUE_BYTES)
        self._native_hooks = _NativeHooks(
            out_topic=self._sanitized_topic,
            sanitize_key=lambda topic, key: self.sanitize_key(topic[self._prefix_len:], key),
            load_keys=self._load_keys_from, key_not_loaded=_KeyNotLoaded, activity=self.subject_activity,
            audit_topic=self.settings.audit_topic)

    @property
    def hot_path(self) -> str:
        """`native` or `python`: which transform handles ordinary events (for logs and the bench)."""
        return "native" if self._fast is not None else "python"

    # ------------------------------------------------------------------------------------------
    def process(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        trace_id: str | None = None,
    ) -> Outcome:
        self._trace_id = trace_id
        if self._fast is not None and value is not None:
            outcome = self._fast_process(topic, partition, offset, key, value)
            if outcome is not None:
                return outcome
        try:
            return self._process(topic, partition, offset, key, value)
        except KeyShreddedError:
            return self._dlq(topic, partition, offset, key, value, "subject_erased",
                             "a write for a data subject whose key was destroyed (erased); not re-created")
        except KeyUnavailableError:
            raise
        except DecodeError as exc:
            return self._dlq(topic, partition, offset, key, value, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the stream nor leak the record
            return self._dlq(topic, partition, offset, key, value, "internal_error",
                             f"unexpected {type(exc).__name__} while sanitizing")

    @property
    def runs_native(self) -> bool:
        """Whether `run_native` may be used (the native path is on)."""
        return self._fast is not None

    def run_native(self, records: list[tuple[Any, str, int, int, bytes | None]], start: int, *,
                   produce: Callable[..., None], poll: Callable[[float], int],
                   partitions: Callable[[str, str], int], max_record_bytes: int) -> NativeRun:
        """Sanitize and produce `records[start:]` natively up to the first record that needs `process`.

        `records` are the runner's `(message, topic, partition, offset, value)` tuples of one fetched
        batch (after `prefetch`); `produce`/`poll` are the transactional producer's methods and
        `partitions(sanitized topic, raw topic)` the sanitized topic's partition count. The record at
        `end` (if any) has produced nothing; the caller hands it to `process`, then calls again from
        `end + 1`. Kafka errors other than a full local queue propagate (the runner aborts). Only for
        records without Kafka headers and without tracing: those go through `process`, which carries
        the trace context.
        """
        end, last, counts, stamps = self._fast.run(
            records, start, produce=produce, poll=poll, partitions=partitions, hooks=self._native_hooks,
            now_ms=int(self._clock() * 1000), max_record_bytes=max_record_bytes)
        plans = self._fast_plans
        shapes = [(plans[plan_id].schema_table, plans[plan_id].class_counts, n) for plan_id, n in counts]
        return NativeRun(end, last, shapes, stamps)

    def prefetch(self, records: Sequence[tuple[str, int, int, bytes | None]]) -> None:
        """Make sure the data keys a batch needs are loaded with one key-store round trip, not one each.

        Python path: the batch is decoded here and its keys loaded; the decoded events are kept for
        `process`, so nothing is decoded twice. Native path: nothing is done up front, because in steady
        traffic every key is already cached; the first event whose key isn't loads the keys of the rest
        of the batch at once (`_load_keys_from`, which reads their subjects natively). Records that don't
        decode are left for `process` to send to the DLQ.
        """
        self.expire_value_caches()
        self._predecoded.clear()
        if self._fast is not None:
            self._batch = records
            return
        self._decode_and_load(records)

    def _load_keys_from(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """Native path: decode the batch from this record on and load its keys (once per batch)."""
        batch, self._batch = self._batch, ()
        for i, (t, p, o, _) in enumerate(batch):
            if o == offset and p == partition and t == topic:
                self._decode_and_load(batch[i:])
                break
        else:
            self._decode_and_load([(topic, partition, offset, value)])
        self._predecoded.pop((topic, partition, offset), None)  # this record is being processed already

    def _decode_and_load(self, records: Iterable[tuple[str, int, int, bytes | None]]) -> None:
        subjects: set[str] = set()
        fast = self._fast
        for topic, partition, offset, value in records:
            try:
                if fast is not None and value is not None:
                    hit = fast.subject_value(value)
                    if hit is not None:
                        subjects.add(self._subject_for(hit[1], self._fast_plans[hit[0]].schema_table))
                        continue
                event = decode_value(value)
                if event is None:
                    continue
                row = event.after if event.after is not None else event.before
                if row is not None and event.op != "m":
                    subjects.add(self._subject(self.classifier.plan(event.schema_table, row), row,
                                               event.schema_table))
            except Exception:  # noqa: BLE001, S112 - `process` meets the same record and sends it to the DLQ
                continue
            self._predecoded[(topic, partition, offset)] = (value, event)
        self.keys.prefetch(self.branch, subjects)

    def expire_value_caches(self, *, force: bool = False) -> None:
        """Drop the caches keyed by plaintext values at least every `key_cache_ttl` seconds.

        The Kafka-key, subject-token and mask/index memos map customers' values (ids, card numbers) to
        their protected forms. Emptying them as often as the data-key cache expires means a worker holds
        an erased customer's values no longer than it may hold the customer's key (docs/keys.md).
        """
        now = self._clock()
        if not force and now - self._value_caches_since < self.settings.key_cache_ttl:
            return
        self._value_caches_since = now
        self._key_cache.clear()
        self._subject_tokens.clear()
        for writer in self._writers.values():
            writer.clear_memo()
        if self._fast is not None:
            self._fast.clear_memos()

    def pending_activity(self) -> dict[tuple[str, str], int]:
        """The open batch's (subject, topic) → retention seconds not recorded in the last hour.

        Steady traffic of known customers then costs the key store nothing at commit time; retention
        expiries carry `ACTIVITY_REFRESH_S` of padding to stay on the safe side.
        """
        now = self._clock()
        recorded = self._activity_recorded
        return {pair: retention_s + ACTIVITY_REFRESH_S for pair, retention_s in self.subject_activity.items()
                if (last := recorded.get(pair)) is None or now - last > ACTIVITY_REFRESH_S}

    def mark_recorded(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Note that the key store now has these pairs' activity (call after the write succeeded)."""
        now = self._clock()
        if len(self._activity_recorded) > 500_000:
            self._activity_recorded.clear()
        for pair in pairs:
            self._activity_recorded[pair] = now

    def _subject(self, plan: TablePlan, row: Mapping[str, Any], schema_table: str) -> str:
        return self._subject_for(row.get(plan.subject_column) if plan.subject_column else None, schema_table)

    def _subject_for(self, subject_value: Any, schema_table: str) -> str:
        """The data subject's token: of its id column's value, or of the table for tables without one."""
        subject_id = subject_value if subject_value is not None else f"table:{schema_table}"
        subject = self._subject_tokens.get(subject_id)
        if subject is None:
            subject = self.keys.subject_token(subject_id)
            if len(self._subject_tokens) > 200_000:
                self._subject_tokens.clear()
            self._subject_tokens[subject_id] = subject
        return subject

    def _process(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Outcome:
        schema_table = topic[self._prefix_len:]
        out_topic = self._sanitized_topic(topic)
        out_key = self.sanitize_key(schema_table, key)
        entry = self._predecoded.pop((topic, partition, offset), None) if self._predecoded else None
        pre = entry[1] if entry is not None and entry[0] is value else None
        if isinstance(pre, ChangeEvent):
            event: ChangeEvent | None = pre
        else:
            event = decode_value(value)
        if event is None:
            # Tombstone: forward it with the sanitized key so compaction downstream still works.
            return Outcome(
                [OutRecord(out_topic, out_key, None, partition),
                 self._audit(topic, partition, offset, schema_table, None, None, "tombstone", None, {}, {})],
                "tombstone",
                schema_table,
            )
        return self._sanitize_event(event, topic, partition, offset, out_topic, out_key)

    def _sanitize_event(
        self, event: ChangeEvent, topic: str, partition: int, offset: int, out_topic: str, out_key: bytes | None
    ) -> Outcome:
        row = event.after if event.after is not None else event.before
        if event.op == "m" and event.message is not None:
            row = {"prefix": event.message.get("prefix"), "content": event.message.get("content")}
            event.after = row
        if row is None:  # truncate
            value = self._change(event, None, None, None, [])
            return Outcome(
                [OutRecord(out_topic, out_key, value, partition),
                 self._audit(topic, partition, offset, event.schema_table, event.op, None, "truncate", None, {}, {})],
                "truncate",
                event.schema_table,
            )
        plan = self.classifier.plan(event.schema_table, row)
        extra: list[OutRecord] = []
        if plan.unclassified:
            extra.extend(self._drift_alerts(plan, topic))
        subject = self._subject(plan, row, event.schema_table)
        row_key = out_key or b""
        decision = "protected"
        if self._batch and self.keys.cached_subject_aead(self.branch, subject) is None:
            self._load_keys_from(topic, partition, offset, None)  # native mode: the batch's keys load lazily
        try:
            aead: Aead | None = self.keys.subject_aead(self.branch, subject)
        except KeyShreddedError:
            # Tables travel on separate topics, so a customer's root-row delete can be processed before
            # changes to its other rows that were committed earlier. Those belong to the erased subject:
            # they flow without their protected fields. Only changes committed after the erasure are
            # refused (DLQ + anomaly), because nothing should write an erased customer's data any more.
            if event.op != "d" and not self._committed_before_erasure(subject, event.source_ts_ms):
                raise
            aead, decision = None, "erased_delete" if event.op == "d" else "erased_late"
        before = self._image(plan, event.before, aead, out_topic, event.schema_table, row_key, "before", subject)
        after = self._image(plan, event.after, aead, out_topic, event.schema_table, row_key, "after", subject)
        value = self._change(event, subject, before, after, [p.name for p in plan.unclassified])
        self.subject_activity[(subject, out_topic)] = plan.retention_s
        records = [OutRecord(out_topic, out_key, value, partition)]
        images = (event.before is not None) + (event.after is not None)
        records.append(self._audit_for_plan(topic, partition, offset, plan, event.op, subject, decision, images,
                                            aead is not None))
        records.extend(extra)
        if event.op == "d" and plan.subject_root and decision == "protected" and self.act_on_deletes:
            records.extend(self.erase(subject, trigger="cdc_delete", reason_code="art47_1_purpose_achieved",
                                      reason="the data subject's root row was deleted in the branch database",
                                      by=f"worker:{self.settings.worker_id}",
                                      source=(topic, partition, offset), effective_ms=event.source_ts_ms))
        return Outcome(records, decision, event.schema_table, plan.class_counts)

    def _fast_process(self, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes) -> Outcome | None:
        """The native path's outcome for a record, or None when it must take the Python path.

        Any exception in the native path (an erased subject, an unreachable key store, a value it can't
        read) also sends the event to the Python path, which meets the same condition and handles it
        with its full policy (DLQ, erasure rules, abort and retry); nothing is produced twice, because
        the native path returns its records instead of producing them.
        """
        out_topic = self._sanitized_topic(topic)
        try:
            out_key = self.sanitize_key(topic[self._prefix_len:], key)
            args = (value, topic, partition, offset, out_topic, out_key or b"", self._trace_id,
                    int(self._clock() * 1000))
            try:
                done = self._fast.process(*args)
            except _KeyNotLoaded:
                self._load_keys_from(topic, partition, offset, value)
                done = self._fast.process(*args)
        except Exception:  # noqa: BLE001 - the Python path decides what the condition means
            done = None
        except BaseException as exc:  # a Rust panic arrives as pyo3's PanicException, a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            log.error("native hot path failed (%s); this event takes the Python path", type(exc).__name__)
            done = None
        if done is None:
            return None
        sanitized, audit_value, audit_key, subject, plan_id = done
        plan = self._fast_plans[plan_id]
        self.subject_activity[(subject, out_topic)] = plan.retention_s
        return Outcome([OutRecord(out_topic, out_key, sanitized, partition),
                        OutRecord(self.settings.audit_topic, audit_key, audit_value)],
                       "protected", plan.schema_table, plan.class_counts)

    def _sanitized_topic(self, topic: str) -> str:
        """Where a raw topic's sanitized records go (cached: this runs per event)."""
        out_topic = self._out_topics.get(topic)
        if out_topic is None:
            out_topic = self._out_topics[topic] = self.settings.sanitized_prefix + topic
        return out_topic

    def _cached_aead(self, subject: str) -> Aead:
        """The native path's key lookup: the cached key, or `_KeyNotLoaded` (never a round trip per event)."""
        aead = self.keys.cached_subject_aead(self.branch, subject)
        if aead is None:
            raise _KeyNotLoaded
        return aead

    def _fast_audit_parts(self, topic: str, partition: int, plan_id: int, op: str,
                          images: int) -> tuple[bytes, bytes, bytes, bytes]:
        """The constant parts of the native path's audit records (the same template as the Python path)."""
        template, record_key = self._audit_template(topic, partition, self._fast_plans[plan_id], op, "protected",
                                                    images, True)
        return (*template.parts, record_key)

    def _register_fast(self, plan: TablePlan) -> None:
        """Hand a plan the Python path has built to the native path (ordinary events of it go there next)."""
        self._fast_plans[id(plan)] = plan
        self._fast.register(
            id(plan), plan.schema_table, list(plan.columns), subject_column=plan.subject_column,
            usable=not plan.unclassified, subject_root=plan.subject_root, clear=list(plan.clear),
            masks=list(plan.masks), index=list(plan.index), hashed=list(plan.hashed), dropped=list(plan.dropped),
            sealed=list(plan.sealed), retention_s=plan.retention_s)

    def _committed_before_erasure(self, subject: str, source_ts_ms: int | None) -> bool:
        """Whether a change committed at `source_ts_ms` predates the erasure of `subject`."""
        if source_ts_ms is None:
            return False
        effective = self._erased_at.get(subject)
        if effective is None:
            raw = self.keys.store.erased_record(self.branch, subject)
            doc = orjson.loads(raw) if raw else {}
            effective = int(doc.get("effective_ms") or doc.get("at_ms") or 0)
            if len(self._erased_at) > 100_000:
                self._erased_at.clear()
            self._erased_at[subject] = effective
        return source_ts_ms <= effective

    # ------------------------------------------------------------------------------------------
    def sanitize_key(self, schema_table: str, key: bytes | None) -> bytes | None:
        """The Kafka key with every column the catalog doesn't allow in clear replaced by its blind index."""
        if key is None:
            return None
        cached = self._key_cache.get((schema_table, key))
        if cached is not None:
            return cached
        try:
            doc = orjson.loads(key)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
            doc = doc["payload"]
        if isinstance(doc, dict):
            out = {}
            for column, value in doc.items():
                policy = self.classifier.key_policy(schema_table, column)
                if policy is not None and policy.action.value == "clear" and isinstance(value, _SCALARS):
                    out[column] = value
                else:
                    out[column] = self.keys.index.token(orjson.dumps(value))
            result = orjson.dumps(out)
        else:
            result = orjson.dumps({"_key": self.keys.index.token(key)})
        if len(self._key_cache) > 100_000:
            self._key_cache.clear()
        self._key_cache[(schema_table, key)] = result
        return result

    def _image(
        self,
        plan: TablePlan,
        row: Mapping[str, Any] | None,
        aead: Aead | None,
        topic: str,
        table: str,
        row_key: bytes,
        image: str,
        subject: str,
    ) -> bytes | None:
        """One image as Avro bytes: one AES-GCM call seals every protected column (None: no image)."""
        if row is None:
            return None
        if tuple(row) != plan.columns:
            plan = self.classifier.plan(table, row)
        writer = self._writers.get(id(plan))
        if writer is None:
            writer = ImageWriter(clear=plan.clear, masks=plan.masks, index=plan.index, hashed=plan.hashed,
                                 dropped=plan.dropped, sealed=plan.sealed, mask=mask, token=self.keys.index.token,
                                 keyed_hash=self.keys.keyed_hash.digest)
            self._writers[id(plan)] = writer
            if self._fast is not None:
                self._register_fast(plan)
        ciphertext = None
        if aead is not None:
            fields = writer.sealed_fields
            if fields:
                aad = self._aad(topic, table, row_key, image, subject, fields, aead.version)
                ciphertext = aead.seal(orjson.dumps([row[c] for c in fields]), aad)
            else:
                ciphertext = b""
        return writer.write(row, ciphertext)

    def _change(
        self,
        event: ChangeEvent,
        subject: str | None,
        before: bytes | None,
        after: bytes | None,
        unclassified: list[str],
    ) -> bytes:
        return self.sanitized_codec.header + encode_change(
            op=event.op, table=event.schema_table, branch=self.branch, db=event.database, ts_ms=event.ts_ms,
            source_ts_ms=event.source_ts_ms, position=event.position, subject=subject, before=before,
            after=after, unclassified=unclassified)

    def _audit_for_plan(self, topic: str, partition: int, offset: int, plan: TablePlan, op: str, subject: str,
                        decision: str, images: int, sealed: bool) -> OutRecord:
        """The per-event audit record, from a template cached per (partition, plan, op, decision, shape)."""
        template, record_key = self._audit_template(topic, partition, plan, op, decision, images, sealed)
        value = self.audit_codec.header + template.encode(int(self._clock() * 1000), offset, subject, self._trace_id)
        return OutRecord(self.settings.audit_topic, record_key, value)

    def _audit_template(self, topic: str, partition: int, plan: TablePlan, op: str, decision: str, images: int,
                        sealed: bool) -> tuple[AuditTemplate, bytes]:
        """(template, record key) of the audit records of one (partition, plan, op, decision, shape)."""
        key = (topic, partition, id(plan), op, decision, images, sealed)
        cached = self._audit_templates.get(key)
        if cached is None:
            template = AuditTemplate(worker=self.settings.worker_id, branch=self.branch, source_topic=topic,
                                     source_partition=partition, table=plan.schema_table, op=op,
                                     decision=decision, reason=None, classes=dict(plan.class_counts),
                                     actions=_action_counts(plan, images, sealed),
                                     unclassified=[p.name for p in plan.unclassified])
            if len(self._audit_templates) > 50_000:
                self._audit_templates.clear()
            cached = self._audit_templates[key] = (template, f"{topic}:{partition}".encode())
        return cached

    # ------------------------------------------------------------------------------------------
    def _audit(
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
            "trace_id": self._trace_id,
        }
        return OutRecord(self.settings.audit_topic, f"{topic}:{partition}".encode(), self.audit_codec.encode(record))

    def _dlq(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        detail: str,
    ) -> Outcome:
        """A DLQ record: the reason, where the input was, and the input sealed (never plaintext).

        Inputs larger than `QUARANTINE_MAX_BYTES` are not copied (the DLQ record would exceed Kafka's
        message size); they stay at their source offset until the raw topic's retention ends.
        """
        aad = f"bg-dlq|{topic}|{partition}|{offset}".encode()
        copy = value is not None and len(value) <= QUARANTINE_MAX_BYTES
        body = {
            "type": "dlq",
            "reason": reason,
            "detail": detail,
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "branch": self.branch,
            "worker": self.settings.worker_id,
            "at_ms": int(self._clock() * 1000),
            "value_bytes": None if value is None else len(value),
            "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
            "quarantine": {
                "aad": aad.decode(),
                "key": None if key is None else _b64(self.keys.quarantine.seal(key, aad + b"|key")),
                "value": _b64(self.keys.quarantine.seal(value, aad + b"|value")) if copy and value else None,
                "note": "AES-256-GCM under the tenant's quarantine key; associated data = aad + '|key' / '|value'"
                        if copy or value is None else
                        f"input larger than {QUARANTINE_MAX_BYTES} bytes: not copied; it stays at the source "
                        "offset until the raw topic's retention ends",
            },
            "action": "fix the producer (or classify the table in schemas/catalog.toml) and re-send the change; "
                      "the quarantined input can be opened with the tenant's quarantine key",
        }
        dlq_key = self.keys.index.token(key) if key is not None else None
        records = [
            OutRecord(self.settings.dlq_topic, None if dlq_key is None else dlq_key.encode(), orjson.dumps(body)),
            self._audit(topic, partition, offset, topic[self._prefix_len:], None, None, "dlq", reason, {}, {}),
        ]
        if reason == "subject_erased":
            records.append(self._anomaly("write_for_erased_subject", "high", topic[self._prefix_len:], None, {
                "source": body["source"],
                "what": "a create/update arrived for a data subject whose key was crypto-shredded",
                "suggested_action": "check why the branch database still writes this customer's data after erasure",
            }))
        return Outcome(records, "dlq", topic[self._prefix_len:], dlq_reason=reason)

    def too_large(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Outcome:
        """The DLQ outcome for an input whose sanitized output exceeds Kafka's message size."""
        return self._dlq(topic, partition, offset, key, value, "output_too_large",
                         "the sanitized record is larger than the producer's message.max.bytes")

    def _anomaly(self, rule: str, severity: str, table: str, column: str | None, evidence: dict[str, Any]) -> OutRecord:
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

    def _drift_alerts(self, plan: TablePlan, topic: str) -> list[OutRecord]:
        alerts = []
        for policy in plan.unclassified:
            if not self._alert_once(f"drift:{plan.schema_table}:{policy.name}"):
                continue
            alerts.append(self._anomaly("schema_drift_unclassified_column", "medium" if policy.category == "unknown"
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
    def erase(
        self,
        subject: str,
        *,
        trigger: str,
        reason_code: str,
        reason: str,
        by: str,
        source: tuple[str, int, int] | None = None,
        topics: list[str] | None = None,
        effective_ms: int | None = None,
    ) -> list[OutRecord]:
        """Crypto-shred a data subject (or hold it storage-only) and return the confirmation records."""
        now_ms = int(self._clock() * 1000)
        confirmation_id = str(uuid.uuid4())
        held = self.keys.store.is_held(self.branch, subject)
        known_topics = sorted(set(topics or []) | {t for s, t in self.subject_activity if s == subject}
                              | self.keys.store.subject_topics(self.branch, subject))
        if held:
            outcome, destroyed, already = "held_storage_only", 0, False
            self.keys.store.set_storage_only(self.branch, subject, confirmation_id)
        else:
            record = orjson.dumps({"id": confirmation_id, "at_ms": now_ms, "reason_code": reason_code, "by": by,
                                   "effective_ms": effective_ms or now_ms})
            result = self.keys.shred(self.branch, subject, record)
            self.keys.store.forget_expiry(self.branch, subject)
            destroyed, already = result.versions_destroyed, result.already_erased
            self.expire_value_caches(force=True)
            outcome = "already_erased" if already and destroyed == 0 else "shredded"
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
            "method": "crypto-shredding: every version of the data subject's AES-256 key destroyed in the shared "
                      "key store; ciphertexts in every topic, replica and backup become unreadable"
                      if not held else "none: subject under legal hold; processing limited to storage",
            "keys_destroyed": [f"dek/{self.branch}/{subject}/v{v}" for v in range(1, destroyed + 1)],
            "unreadable_topics": known_topics if not held else [],
            "at_ms": now_ms,
            "by": by,
            "source": None if source is None else {"topic": source[0], "partition": source[1], "offset": source[2]},
            "audit": {"topic": self.settings.audit_topic, "decision": outcome},
        }
        body = orjson.dumps(confirmation)
        audit_source = source or ("erase", 0, 0)
        audit = self._audit(audit_source[0], audit_source[1], audit_source[2], None, "erase", subject,
                            "held" if held else "shredded", f"{reason_code}; confirmation {confirmation_id}; "
                            f"sha256 {hashlib.sha256(body).hexdigest()}", {}, {"keys_destroyed": destroyed})
        return [OutRecord(self.settings.deletions_topic, subject.encode(), body), audit]


@dataclass(slots=True, frozen=True)
class _NativeHooks:
    """The sanitizer's side of `guard_native.FastPath.run` (see `Sanitizer.run_native`)."""

    out_topic: Callable[[str], str]
    sanitize_key: Callable[[str, bytes], bytes | None]
    load_keys: Callable[[str, int, int, bytes | None], None]
    key_not_loaded: type[Exception]
    activity: dict[tuple[str, str], int]
    audit_topic: str


class _KeyNotLoaded(Exception):
    """A data key is not in this worker's cache: load the batch's keys, then try again."""


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


class _LocalOnce:
    """Deduplicates alerts within one process (the runner passes a Redis-backed one across workers)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True
