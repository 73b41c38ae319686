"""The sanitizer's transform: one raw Debezium record in, the records to produce out.

This module knows nothing about Kafka clients or transactions (see `guard.kafka.runner`); it is a pure
function of the input record plus the key manager and catalog, so the offline `guard sanitize` command and
the live pipeline run exactly the same code. (`run_native` is handed the runner's `produce` function so the
native path can produce runs of a batch itself; it still never sees a client or a transaction.)

An event goes down four stages once, each a class of its own with a narrow interface:

* decode (`guard.pipeline.decode.Decoder`): the Debezium envelope, decoded ahead per batch;
* plan (`guard.pipeline.plan.Planner`): the cached table plan, the data subject, the output topic;
* protect (`guard.pipeline.protect.Protector`): the subject's key, then per image one AES-256-GCM call
  that seals every protected column, display masks and blind indexes; the Kafka key's blind index;
* emit (`guard.records.builders.RecordBuilder`): the sanitized change, audit, anomaly, DLQ and deletion
  records.

`Sanitizer` runs them in that order, owns what spans them (a batch's key prefetch, the value caches'
expiry, the subjects' activity, erasure) and hands ordinary events to the compiled path when it is on.

Failure policy (fail closed): anything that can't be decoded or protected goes to the DLQ with a reason
code and the raw value sealed under the tenant's quarantine key, never in plaintext. Only an unreachable
key store is *not* a per-record failure: `KeyUnavailableError` propagates so the runner aborts the
transaction and retries the batch once the store is back, instead of flooding the DLQ.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from guard.cdc.envelope import MAX_VALUE_BYTES, ChangeEvent, decode_value
from guard.classify.catalog import Catalog
from guard.classify.plans import TablePlan
from guard.config import Settings
from guard.errors import DecodeError, KeyShreddedError, KeyUnavailableError
from guard.keys.manager import KeyManager
from guard.keys.primitives import Aead
from guard.pipeline.decode import Decoder
from guard.pipeline.plan import Planner
from guard.pipeline.protect import Protector
from guard.protect.fastpath import new_fast_path, use_native
from guard.protect.masking import mask
from guard.records.builders import OutRecord, RecordBuilder

log = logging.getLogger(__name__)

#: A worker re-records a (subject, topic) pair's activity in the key store at most this often; expiries
#: are padded by the same amount, so a retention sweep is never early, at most this much late.
ACTIVITY_REFRESH_S = 3600


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
        # The stages, in the order an event meets them.
        self.decoder = Decoder()
        self.planner = Planner(settings, keys, catalog)
        self.classifier = self.planner.classifier
        self.protector = Protector(keys, self.classifier, self.branch)
        self.emitter = RecordBuilder(settings, keys, registry=registry, alert_once=alert_once, clock=clock)
        self.sanitized_codec = self.emitter.sanitized_codec
        self.audit_codec = self.emitter.audit_codec
        self.sanitize_key: Callable[[str, bytes | None], bytes | None] = self.protector.sanitize_key
        #: The data subject's token of an id value (`Planner.subject_for`; the native-path tests name it).
        self._subject_for = self.planner.subject_for
        self._clock = clock
        self._prefix_len = len(settings.raw_topic_prefix) + 1
        # The caches keyed by customers' values, held by the stages and emptied here together.
        self._key_cache = self.protector.key_cache
        self._subject_tokens = self.planner.subject_tokens
        self._writers = self.protector.writers
        #: (subject, sanitized topic) → retention seconds, for the pairs seen since the last commit: where
        #: each subject's ciphertexts went (deletion confirmations) and when its data expires (retention).
        self.subject_activity: dict[tuple[str, str], int] = {}
        #: Whether a delete of a subject's root row erases the subject (False for offline runs).
        self.act_on_deletes = True
        self._activity_recorded: dict[tuple[str, str], float] = {}
        self._value_caches_since = clock()
        #: Plans registered with the native path, by id (it reports which one it used).
        self._fast_plans: dict[int, TablePlan] = {}
        self._fast: Any = None
        #: Native path: the batch `prefetch` was given, until a key miss loads its keys (`_load_keys_from`).
        self._batch: Sequence[tuple[str, int, int, bytes | None]] = ()
        if use_native(settings.hot_path):
            self._fast = new_fast_path(
                branch=self.branch, sanitized_header=self.sanitized_codec.header,
                audit_header=self.audit_codec.header, subject_of=self.planner.subject_for,
                aead_for=self._cached_aead, audit_parts=self._fast_audit_parts, dumps=orjson.dumps,
                loads=orjson.loads, mask=mask, token=keys.index.token, keyed_hash=keys.keyed_hash.digest,
                max_value_bytes=MAX_VALUE_BYTES)
            self.protector.on_new_plan = self._register_fast
        self._native_hooks = _NativeHooks(
            out_topic=self.planner.sanitized_topic,
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
        self.emitter.trace_id = trace_id
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
        self.keys.check_tenant_keys()  # a vanished tenant key stops the worker (at most every few seconds)
        self.expire_value_caches()
        self.decoder.clear()
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
        self.decoder.forget(topic, partition, offset)  # this record is being processed already

    def _decode_and_load(self, records: Iterable[tuple[str, int, int, bytes | None]]) -> None:
        subjects: set[str] = set()
        fast = self._fast
        for topic, partition, offset, value in records:
            try:
                if fast is not None and value is not None:
                    hit = fast.subject_value(value)
                    if hit is not None:
                        subjects.add(self.planner.subject_for(hit[1], self._fast_plans[hit[0]].schema_table))
                        continue
                event = decode_value(value)
                if event is None:
                    continue
                row = event.after if event.after is not None else event.before
                if row is not None and event.op != "m":
                    subjects.add(self.planner.subject(self.classifier.plan(event.schema_table, row), row,
                                                      event.schema_table))
            except Exception:  # noqa: BLE001, S112 - `process` meets the same record and sends it to the DLQ
                continue
            self.decoder.keep(topic, partition, offset, value, event)
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

    def _process(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Outcome:
        schema_table = topic[self._prefix_len:]
        out_topic = self.planner.sanitized_topic(topic)
        out_key = self.sanitize_key(schema_table, key)
        event = self.decoder.decode(topic, partition, offset, value)
        if event is None:
            # Tombstone: forward it with the sanitized key so compaction downstream still works.
            return Outcome(
                [OutRecord(out_topic, out_key, None, partition),
                 self.emitter.audit(topic, partition, offset, schema_table, None, None, "tombstone", None, {}, {})],
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
            value = self.emitter.change(event, None, None, None, [])
            return Outcome(
                [OutRecord(out_topic, out_key, value, partition),
                 self.emitter.audit(topic, partition, offset, event.schema_table, event.op, None, "truncate", None,
                                    {}, {})],
                "truncate",
                event.schema_table,
            )
        plan = self.classifier.plan(event.schema_table, row)
        extra: list[OutRecord] = []
        if plan.unclassified:
            extra.extend(self.emitter.drift_alerts(plan, topic))
        subject = self.planner.subject(plan, row, event.schema_table)
        row_key = out_key or b""
        if self._batch and self.keys.cached_subject_aead(self.branch, subject) is None:
            self._load_keys_from(topic, partition, offset, None)  # native mode: the batch's keys load lazily
        protect = self.protector
        aead, decision = protect.subject_aead(subject, event)
        before = protect.image(plan, event.before, aead, out_topic, event.schema_table, row_key, "before", subject)
        after = protect.image(plan, event.after, aead, out_topic, event.schema_table, row_key, "after", subject)
        value = self.emitter.change(event, subject, before, after, [p.name for p in plan.unclassified])
        self.subject_activity[(subject, out_topic)] = plan.retention_s
        records = [OutRecord(out_topic, out_key, value, partition)]
        images = (event.before is not None) + (event.after is not None)
        records.append(self.emitter.audit_for_plan(topic, partition, offset, plan, event.op, subject, decision,
                                                   images, aead is not None))
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
        out_topic = self.planner.sanitized_topic(topic)
        try:
            out_key = self.sanitize_key(topic[self._prefix_len:], key)
            args = (value, topic, partition, offset, out_topic, out_key or b"", self.emitter.trace_id,
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

    def _cached_aead(self, subject: str) -> Aead:
        """The native path's key lookup: the cached key, or `_KeyNotLoaded` (never a round trip per event)."""
        aead = self.keys.cached_subject_aead(self.branch, subject)
        if aead is None:
            raise _KeyNotLoaded
        return aead

    def _fast_audit_parts(self, topic: str, partition: int, plan_id: int, op: str,
                          images: int) -> tuple[bytes, bytes, bytes, bytes]:
        """The constant parts of the native path's audit records (the same template as the Python path)."""
        template, record_key = self.emitter.audit_template(topic, partition, self._fast_plans[plan_id], op,
                                                           "protected", images, True)
        return (*template.parts, record_key)

    def _register_fast(self, plan: TablePlan) -> None:
        """Hand a plan the Python path has built to the native path (ordinary events of it go there next)."""
        self._fast_plans[id(plan)] = plan
        self._fast.register(
            id(plan), plan.schema_table, list(plan.columns), subject_column=plan.subject_column,
            usable=not plan.unclassified, subject_root=plan.subject_root, clear=list(plan.clear),
            masks=list(plan.masks), index=list(plan.index), hashed=list(plan.hashed), dropped=list(plan.dropped),
            sealed=list(plan.sealed), retention_s=plan.retention_s)

    # ------------------------------------------------------------------------------------------
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
        """The DLQ outcome: the DLQ record (the input sealed, never plaintext), its audit, and for a write
        to an erased subject an anomaly (`RecordBuilder.dlq`)."""
        records = self.emitter.dlq(topic, partition, offset, key, value, reason, detail)
        return Outcome(records, "dlq", topic[self._prefix_len:], dlq_reason=reason)

    def too_large(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Outcome:
        """The DLQ outcome for an input whose sanitized output exceeds Kafka's message size."""
        return self._dlq(topic, partition, offset, key, value, "output_too_large",
                         "the sanitized record is larger than the producer's message.max.bytes")

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
        return self.emitter.deletion(subject, confirmation_id=confirmation_id, outcome=outcome, held=held,
                                     destroyed=destroyed, known_topics=known_topics, trigger=trigger,
                                     reason_code=reason_code, reason=reason, by=by, source=source, now_ms=now_ms)


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
