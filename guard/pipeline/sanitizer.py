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
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import islice
from operator import itemgetter
from typing import Any, ClassVar

import orjson

from guard.cdc.envelope import MAX_VALUE_BYTES, ChangeEvent, decode_value
from guard.classify.catalog import ERASURE_REASONS, Catalog
from guard.classify.plans import TablePlan
from guard.config import Settings
from guard.errors import DecodeError, KeyShreddedError, KeyUnavailableError
from guard.keys.manager import KeyManager
from guard.pipeline.activity import SEND_EVERY_RECORDS, EarlyActivity, RecentPairs
from guard.pipeline.decode import Decoder
from guard.pipeline.erasure_records import pending_entry, pending_records, what_remains
from guard.pipeline.keyload import ChunkedKeyLoad, plan_chunks
from guard.pipeline.plan import Planner
from guard.pipeline.policy import AttributionPending, WriteChecker, WriteDecision, principal_text
from guard.pipeline.protect import Protector
from guard.pipeline.values import amount_band, relationship_end_s
from guard.protect.fastpath import first_traced, new_fast_path, scan_writes, use_native
from guard.protect.masking import mask
from guard.records.builders import OutRecord, RecordBuilder
from guard.records.codec import write_reason

log = logging.getLogger(__name__)

#: The Kafka header of a sanitized record whose write the policy did not allow (JSON: decision, principal,
#: action, policies, reason, errors). Records without it were allowed (docs/policy.md).
POLICY_HEADER = "bg-policy"

#: The raw topic of a runner's `(message, topic, partition, offset, value)` record.
_TOPIC = itemgetter(1)

#: A worker writes a (subject, topic) pair's activity to the key store again at most this long after it last
#: wrote it, and not before half of it (`RecentPairs`): the key store's record of a pair is renewed at least
#: this often, and known customers' steady traffic costs the key store nothing in between.
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
    #: Transaction facts produced besides (creates of tables with amount bands reaching a band).
    facts: int = 0
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
        #: Sanitized topics of root tables (`subject_root`): activity there means the root row exists.
        self.root_topics: set[str] = set()
        #: subject → retention expiry (unix s) a relationship-end delete of the open batch started.
        self.delete_expiries: dict[str, float] = {}
        #: subject → (due, info) of the erasures the open batch's root deletes schedule: written to the key
        #: store in one call before the commit (`take_erasure_schedules`), not one round trip per delete.
        self.erasure_schedules: dict[str, tuple[float, bytes]] = {}
        #: subject → retention expiry from a root row's relationship-end column (None: not ended).
        self.column_expiries: dict[str, float | None] = {}
        #: Whether a delete of a subject's root row erases the subject (False for offline runs).
        self.act_on_deletes = True
        #: Who writes pending confirmations (`erase`): the runner sets its transactional id + incarnation.
        self.owner = f"worker:{settings.worker_id}#{uuid.uuid4()}"
        #: subject → confirmation id of the pending confirmations the open transaction carries.
        self.pending_in_txn: dict[str, str] = {}
        self._activity_recorded = RecentPairs(clock, ACTIVITY_REFRESH_S)
        self._value_caches_since = clock()
        #: schema table → its catalog columns with amount bands: a new row reaching a band is reported to the
        #: anomaly analyzers as a `transaction` fact (`_band_facts`; such events don't take the native run).
        self._banded: dict[str, tuple[tuple[str, tuple[tuple[str, Decimal], ...]], ...]] = {}
        for name in catalog.tables():
            policy = catalog.table(name)
            banded = tuple((c, p.bands) for c, p in policy.columns.items() if p.bands) if policy else ()
            if banded:
                self._banded[name] = banded
        #: The configuration of a sanitized topic (cleanup.policy, retention.ms, …) or None if unknown; the
        #: runner and `guard erase` set it (`TopicManager.configs`). Compacted topics get erasure tombstones,
        #: and deletion confirmations say until when each topic keeps what remains of a customer.
        self.topic_configs: Callable[[str], Mapping[str, str] | None] = lambda _topic: None
        self._compacted: dict[str, bool] = {}
        #: The access-policy check of every write (None: policy off); `runtime.build_sanitizer` sets it.
        self.checker: WriteChecker | None = None
        #: Plans registered with the native path, by id (it reports which one it used).
        self._fast_plans: dict[int, TablePlan] = {}
        self._fast: Any = None
        #: The compiled path's memo lookups and hits taken so far (`memo_counters`).
        self._memo_counts = [0, 0]
        #: Native path: the batch `prefetch` was given, until a key miss loads its keys (`_load_keys_from`).
        self._batch: Sequence[tuple[str, int, int, bytes | None]] = ()
        #: Native path: the chunks of the batch's key load still to come (`guard.pipeline.keyload`).
        self._key_load = ChunkedKeyLoad(keys, self.branch)
        #: The open batch's activity sent before its commit (`send_activity`), and how many entries of
        #: `subject_activity` the last send looked at.
        self._early_activity = EarlyActivity(keys.store, self.branch)
        self._activity_seen = 0
        #: (batch, first index read, indexes a native run stops before): `_run_stop`'s memo for one batch.
        self._stops: tuple[list[Any], int, list[int]] | None = None
        if use_native(settings.hot_path):
            self._fast = new_fast_path(
                branch=self.branch, sanitized_header=self.sanitized_codec.header,
                audit_header=self.audit_codec.header, subject_of=self.planner.subject_for,
                key_cache=keys.native_key_cache(), key_not_loaded=_KeyNotLoaded,
                audit_parts=self._fast_audit_parts, dumps=orjson.dumps,
                loads=orjson.loads, mask=mask, token=keys.search_token, keyed_hash=keys.keyed_hash.digest,
                max_value_bytes=MAX_VALUE_BYTES, subject_key=self._native_token_key("subject", "subject_token"))
            self.protector.on_new_plan = self._register_fast
        self._native_hooks = _NativeHooks(
            out_topic=self.planner.sanitized_topic,
            sanitize_key=lambda topic, key: self.sanitize_key(topic[self._prefix_len:], key),
            key_column=self._key_column,
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
        if self._fast is not None and value is not None and self.checker is None:
            # With the policy on, what reaches `process` is what the native run declined (a write not
            # allowed, a delete, a message): it takes the Python path, which decides it.
            outcome = self._fast_process(topic, partition, offset, key, value)
            if outcome is not None:
                return outcome
        try:
            return self._process(topic, partition, offset, key, value)
        except AttributionPending:
            raise
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
                   partitions: Callable[[str, str], int], max_record_bytes: int, chains: Any = None) -> NativeRun:
        """Sanitize and produce `records[start:]` natively up to the first record that needs `process`.

        `records` are the runner's `(message, topic, partition, offset, value)` tuples of one fetched
        batch (after `prefetch`); `produce`/`poll` are the transactional producer's methods and
        `partitions(sanitized topic, raw topic)` the sanitized topic's partition count. The record at
        `end` (if any) has produced nothing; the caller hands it to `process`, then calls again from
        `end + 1`. Kafka errors other than a full local queue propagate (the runner aborts). Not for a
        worker with tracing, nor for a record with a `traceparent` header: those go through `process`, which
        carries the trace context (other headers, such as Debezium's `__debezium.context.*`, are carried by
        neither path). `chains` (the worker's `AuditChains`): the run chains its audit records itself
        (`guard_native.FastPath.run`); without it `produce` must.
        """
        # The run stops before a record bound for a compacted topic or carrying a trace context (`_run_stop`).
        stop = self._run_stop(records, start)
        checker = self.checker
        reasons: list[bytes | None] | None = None
        if checker is not None and stop > start:
            # The run's write decisions first, read natively in one call (`scan_writes`: the bytes as
            # `policy.scan_write` reads them); `decide` runs once per distinct (op, table, principal,
            # second), itself memoised. The run stops before the first record that needs the Python path
            # to decide it (a write not allowed, a delete, a message, anything the scan can't read).
            stop, reasons = scan_writes(records, start, stop, checker.message_topic, self._scan_decider(checker))
        if stop == start:
            return NativeRun(start, [], [], [])
        end, last, counts, stamps, banded = start, [], [], [], []
        now_ms = int(self._clock() * 1000)
        try:
            # In pieces of `SEND_EVERY_RECORDS`: between two, the activity of the records sealed so far goes to
            # the key store, which writes it while the run goes on (`guard.pipeline.activity`).
            while True:
                piece = min(stop, end + SEND_EVERY_RECORDS)
                done, *more = self._fast.run(
                    records, end, produce=produce, poll=poll,
                    partitions=partitions, hooks=self._native_hooks, now_ms=now_ms,
                    max_record_bytes=max_record_bytes,
                    reasons=None if reasons is None else reasons[end - start:piece - start],
                    chains=chains, stop=piece)
                last += more[0]
                counts += more[1]
                stamps += more[2]
                banded += more[3]
                end = done
                if end < piece or piece == stop:
                    break
                self.send_activity()
        finally:
            self.keys.count_lookups(*self._fast.take_key_counts())
        facts = self._run_band_facts(banded, produce, poll) if banded else 0
        plans = self._fast_plans
        shapes = [(plans[plan_id].schema_table, plans[plan_id].class_counts, n) for plan_id, n in counts]
        return NativeRun(end, last, shapes, stamps, facts)

    def _run_stop(self, records: list[tuple[Any, str, int, int, bytes | None]], start: int) -> int:
        """Where a native run from `start` must stop at the latest: the first record from `start` on that
        is bound for a compacted sanitized topic or carries a `traceparent` header, else the batch's end.

        Records bound for a compacted sanitized topic take the Python path (their keys are recorded for
        erasure tombstones). A record with a `traceparent` header takes it too (the Python path carries the
        trace context to the outputs); other headers (a live Debezium connector's `__debezium.context.*` on
        every record) don't stop a run: the Python path, untraced, carries none of them either.
        The runner calls `run_native` again after each record a run stops at (a delete, a message, a write
        not allowed), always with the same batch: the batch is read for these stops once, at the first
        call, not at every call (which read the rest of the batch again each time: quadratic in a batch's
        Python-path records). Records of tables with amount bands stay on the native path.
        """
        stops = self._stops
        if stops is None or stops[0] is not records or start < stops[1]:
            stops = self._stops = (records, start, self._find_stops(records, start))
        at = stops[2]
        k = bisect_left(at, start)
        return at[k] if k < len(at) else len(records)

    def forget_batch(self) -> None:
        """Drop what native runs remember of the current batch (its records, plaintext values included):
        the runner calls it when it is done with a batch, so an idle worker holds none of them."""
        self._stops = None
        self._key_load.settle()  # chunks' requests the runs never reached: their keys cached, or dropped
        if self._fast is not None:
            self._fast.forget_read_ahead()  # the envelopes `_load_keys_from` read that no run took

    def _find_stops(self, records: list[tuple[Any, str, int, int, bytes | None]], start: int) -> list[int]:
        """The indexes from `start` on of the records a native run must stop before (`_run_stop`), sorted.
        The batch's topics are checked once each; only a batch with a compacted one is read record by record
        in Python, and the headers are read natively (`first_traced`)."""
        n = len(records)
        topics = set(map(_TOPIC, islice(records, start, None)))
        compacted = {t for t in topics if self._is_compacted(self.planner.sanitized_topic(t))}
        found = [j for j in range(start, n) if records[j][1] in compacted] if compacted else []
        j = first_traced(records, start, n)
        while j < n:
            found.append(j)
            j = first_traced(records, j + 1, n)
        found.sort()
        return found

    def _run_band_facts(self, banded: list[tuple[str, int, int, str, int | None, int, list[tuple[str, Any]]]],
                        produce: Callable[..., None], poll: Callable[[float], int]) -> int:
        """The `transaction` facts of a native run's creates of tables with amount bands (issue 15): the
        same rule and records as `_band_facts` on the Python path (with the input's timestamp), produced
        in the run's transaction after its changes. Returns how many."""
        produced = 0
        for topic, partition, offset, subject, source_ts_ms, ts, values in banded:
            table = topic[self._prefix_len:]
            limits = dict(self._banded.get(table, ()))
            when = source_ts_ms if source_ts_ms is not None else int(self._clock() * 1000)
            for column, value in values:
                band = amount_band(value, limits.get(column, ()))
                if band is None:
                    continue
                rec = self.emitter.band_fact((topic, partition, offset), table, column, subject, band, when)
                while True:
                    try:
                        produce(rec.topic, rec.value, rec.key, -1, None, None, ts)
                        break
                    except BufferError:
                        poll(0.2)
                produced += 1
        return produced

    def _scan_decider(self, checker: WriteChecker) -> Callable[[str, str, bytes | None, int | None], bytes | None]:
        """`scan_writes`' `decide` for one run: a distinct write's decision (`WriteChecker.decide`) as the
        `reason` text of its audit record, None when the write is not allowed (the run stops there and the
        Python path decides the record again). Each distinct decision is encoded once per run."""
        prefix = self._prefix_len
        texts: dict[int, tuple[WriteDecision, bytes]] = {}

        def decide(op: str, topic: str, principal: bytes | None, when: int | None) -> bytes | None:
            write = checker.decide(op, principal_text(principal), topic[prefix:], when)
            if not write.allowed:
                return None
            known = texts.get(id(write))  # the decision is kept with its text: its id stays its own
            if known is None:
                known = texts[id(write)] = (write, write_reason(write.as_dict()).encode())
            return known[1]

        return decide

    def prefetch(self, records: Sequence[tuple[str, int, int, bytes | None]]) -> None:
        """Make sure the data keys a batch needs are loaded with one key-store round trip, not one each.

        Python path: the batch is decoded here and its keys loaded; the decoded events are kept for
        `process`, so nothing is decoded twice. Native path: nothing is done up front, because in steady
        traffic every key is already cached; the first event whose key isn't loads the keys of the rest
        of the batch at once (`_load_keys_from`, which reads their subjects natively). Records that don't
        decode are left for `process` to send to the DLQ.
        """
        self.keys.check_tenant_keys()  # a vanished tenant key stops the worker (at most every few seconds)
        self.keys.purge_expired()  # expired data keys leave memory (docs/keys.md)
        self.expire_value_caches()
        self.decoder.clear()
        self._stops = None
        checker = self.checker
        if checker is not None:
            checker.refresh()
            self._prepare_attributions(checker, records)
        if self._fast is not None:
            self._batch = records
            return
        self._decode_and_load(records)

    def _prepare_attributions(self, checker: WriteChecker,
                              records: Sequence[tuple[str, int, int, bytes | None]]) -> None:
        """The batch's attribution messages and deletes, decoded now (and kept for `process`) so the checker
        records and looks them up in one round trip (`WriteChecker.prepare`).

        A delete is found by its bytes (the last `"op":"` of a JSON envelope, as `policy.scan_write` reads it);
        one not found this way (another encoding) is looked up on its own when it is processed.
        """
        message_topic = checker.message_topic
        messages: list[ChangeEvent] = []
        deletes: list[tuple[tuple[str, int, int], ChangeEvent]] = []
        for topic, partition, offset, value in records:
            if value is None:
                continue
            is_message = topic == message_topic
            if not is_message:
                i = value.rfind(b'"op":"')
                if i < 0 or value[i + 6:i + 7] != b"d":
                    continue
            try:
                event = decode_value(value)
            except Exception:  # noqa: BLE001, S112 - `process` meets the same record and sends it to the DLQ
                continue
            if event is None:
                continue
            self.decoder.keep(topic, partition, offset, value, event)
            if is_message:
                messages.append(event)
            else:
                deletes.append(((topic, partition, offset), event))
        checker.prepare(messages, deletes)

    def _load_keys_from(self, topic: str, partition: int, offset: int, value: bytes | None,
                        index: int | None = None) -> None:
        """Native path: load the keys of the batch from this record on (`index` in the batch, if known).

        The first miss of a batch reads the subject of every record from this one on in one native call
        (`FastPath.batch_subjects`), which returns the distinct subjects' tokens in the order of the records
        that first name them, and the records it can't read (decoded here as on the Python path); the keys
        then load in chunks, every chunk's request sent here and each read while the run seals the records
        of the chunks before it (`guard.pipeline.keyload`). Later misses read the replies of the chunks they
        reach.
        """
        if self._key_load.pending and self._key_load.reach(index):
            return
        batch, self._batch = self._batch, ()
        records = batch if isinstance(batch, list) else list(batch)
        found = self._fast.batch_subjects(records, topic, partition, offset)
        if found is None:  # not in the batch (or the batch's subjects were read already): this record alone
            records = [(topic, partition, offset, value)]
            tokens, rest, _ = self._fast.batch_subjects(records, topic, partition, offset)
            self.keys.prefetch(self.branch, set(tokens) | (self._decode_subjects(records) if rest else set()))
        else:
            tokens, rest, at = found
            extra = self._decode_subjects([records[i] for i in rest]) if rest else set()
            first = index if index is not None else (at[0] if at else 0)
            self._key_load.start(plan_chunks(first, tokens, at, extra))
        self.decoder.forget(topic, partition, offset)  # this record is being processed already

    def _decode_and_load(self, records: Iterable[tuple[str, int, int, bytes | None]]) -> None:
        """Python path: decode the batch (kept for `process`) and load its subjects' keys at once."""
        self.keys.prefetch(self.branch, self._decode_subjects(records))

    def _decode_subjects(self, records: Iterable[tuple[str, int, int, bytes | None]]) -> set[str]:
        """The people whose rows the records hold, decoding each record (kept for `process`). Rows without
        a subject load their per-row key on use; records that don't decode are left for `process`."""
        subjects: set[str] = set()
        for topic, partition, offset, value in records:
            try:
                event = decode_value(value)
                if event is None:
                    continue
                row = event.after if event.after is not None else event.before
                if row is not None and event.op != "m":
                    person = self.planner.person_subject(self.classifier.plan(event.schema_table, row), row,
                                                         event.schema_table)
                    if person is not None:
                        subjects.add(person)
            except Exception:  # noqa: BLE001, S112 - `process` meets the same record and sends it to the DLQ
                continue
            self.decoder.keep(topic, partition, offset, value, event)
        return subjects

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
        self._compacted.clear()
        for writer in self._writers.values():
            writer.clear_memo()
        if self._fast is not None:
            self._fast.clear_memos()

    def memo_counters(self) -> dict[str, int]:
        """The compiled path's memo lookups and hits so far: data-subject tokens, sanitized Kafka keys, and the
        masks and blind indexes it asks Python for, looked up by value (the benchmark reports their hit rate).
        The Python path's writers don't count theirs: zeros without the compiled path."""
        if self._fast is not None:
            lookups, hits = self._fast.take_memo_counts()
            self._memo_counts[0] += lookups
            self._memo_counts[1] += hits
        return {"memo_lookups": self._memo_counts[0], "memo_hits": self._memo_counts[1]}

    def pending_activity(self) -> dict[tuple[str, str], int | None]:
        """The open batch's (subject, topic) pairs not recorded lately (`RecentPairs`) and not sent yet
        (`send_activity`) → None (no expiry change): what the batch still has to write.

        Activity only says where a subject's ciphertexts went; it never moves a retention expiry: retention
        runs from the end of the relationship as the data says it (`take_expiries`). Steady traffic of
        known customers then costs the key store nothing at commit time.
        """
        return dict.fromkeys(self._activity_recorded.unrecorded(self.subject_activity) - self._early_activity.sent)

    def send_activity(self) -> None:
        """Send the activity the open batch added since the last send (pairs not recorded lately: `RecentPairs`),
        its reply read by `activity_written`: the key store writes it meanwhile. Native runs call it every
        `SEND_EVERY_RECORDS` records, and the commit once more for the rest, before `activity_written`.

        Only the entries added since the last send are looked at (entries are only added, in order, while a
        batch runs; a pop, for an erased subject, makes the next send look at every entry again).
        """
        activity = self.subject_activity
        seen = self._activity_seen if self._activity_seen <= len(activity) else 0
        self._activity_seen = len(activity)
        added = islice(activity, seen, None) if seen else activity
        self._early_activity.send(list(self._activity_recorded.unrecorded(added) - self._early_activity.sent))

    def activity_written(self) -> None:
        """Wait for the activity sent during the open batch to be written (raises `KeyUnavailableError` if
        it was not: the batch must not commit) and note it as recorded."""
        self.mark_recorded(self._early_activity.written())

    def reset_batch(self) -> None:
        """Forget what the open batch collected (its transaction committed or was aborted)."""
        self.subject_activity.clear()
        self._early_activity.drop()
        self._activity_seen = 0
        self.pending_in_txn.clear()
        self.delete_expiries.clear()
        self.column_expiries.clear()
        self.erasure_schedules.clear()

    def take_erasure_schedules(self) -> dict[str, tuple[float, bytes]]:
        """The erasures the open batch's root deletes schedule (subject → (due, info)), and forget them.

        The runner writes them before the commit and before `root_changes` is applied, so a root row back
        later in the same batch cancels its erasure as it did when each delete wrote its schedule at once.
        A subject deleted twice in the batch keeps its first schedule (an earlier schedule stands)."""
        out = self.erasure_schedules
        self.erasure_schedules = {}
        return out

    def root_changes(self) -> list[str]:
        """Subjects whose root row was created or changed in the open batch after any delete of it in the
        batch: their scheduled erasure (grace period) or relationship-end retention is cancelled."""
        roots = self.root_topics
        return sorted({subject for subject, topic in self.subject_activity if topic in roots})

    def take_expiries(self, root_changed: Iterable[str]) -> dict[str, float | None]:
        """The retention expiries the open batch sets (unix s; None: the relationship is ongoing), and forget
        them. A relationship-end delete followed by a change of the same root row counts for nothing."""
        changed = set(root_changed)
        out: dict[str, float | None] = {s: at for s, at in self.delete_expiries.items() if s not in changed}
        out.update(self.column_expiries)
        self.delete_expiries.clear()
        self.column_expiries.clear()
        return out

    def mark_recorded(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Note that the key store now has these pairs' activity (call after the write succeeded)."""
        self._activity_recorded.add(pairs)

    def _process(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Outcome:
        schema_table = topic[self._prefix_len:]
        out_topic = self.planner.sanitized_topic(topic)
        out_key = self.sanitize_key(schema_table, key)
        event = self.decoder.decode(topic, partition, offset, value)
        checker = self.checker
        if checker is not None and topic == checker.message_topic:
            # Attribution messages (docs/policy.md): recorded and audited, never on a sanitized topic.
            return self._attribution_message(event, topic, partition, offset)
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
        checker = self.checker
        row = event.after if event.after is not None else event.before
        if event.op == "m" and event.message is not None:
            row = {"prefix": event.message.get("prefix"), "content": event.message.get("content")}
            event.after = row
        if row is None:  # truncate
            return self._truncate(event, topic, partition, offset, out_topic, out_key)
        plan = self.classifier.plan(event.schema_table, row)
        write = None if checker is None else checker.decide_event(event, (topic, partition, offset),
                                                                  subject_root=plan.subject_root)
        extra: list[OutRecord] = []
        if plan.unclassified:
            extra.extend(self.emitter.drift_alerts(plan, topic))
        person = self.planner.person_subject(plan, row, event.schema_table)
        where = (topic, partition, offset)
        subject = person if person is not None else self.planner.row_subject(event.schema_table, out_key, where)
        # Each image is sealed under its own subject: an update that moves a row from customer A to B seals
        # the before image under A's key (erasing A makes it unreadable), the after image under B's.
        before_subject = subject
        only_before: tuple[str, ...] = ()  # columns outside the catalog that only the before image has
        if event.before is not None and event.after is not None:
            before_plan = plan if tuple(event.before) == plan.columns else \
                self.classifier.plan(event.schema_table, event.before)
            before_subject = self.planner.subject(before_plan, event.before, event.schema_table, out_key, where)
            if before_plan is not plan and before_plan.unclassified:
                known = {p.name for p in plan.unclassified}
                only_before = tuple(p.name for p in before_plan.unclassified if p.name not in known)
                extra.extend(self.emitter.drift_alerts(before_plan, topic))  # sealed, and said, as the after's
        row_key = out_key or b""
        if (self._batch or self._key_load.pending) and self.keys.cached_subject_aead(self.branch, subject) is None:
            self._load_keys_from(topic, partition, offset, None)  # native mode: the batch's keys load lazily
        protect = self.protector
        aead, decision = protect.subject_aead(subject, event)
        before_aead = aead if before_subject == subject else protect.other_image_aead(before_subject)
        before = protect.image(plan, event.before, before_aead, out_topic, event.schema_table, row_key, "before",
                               before_subject, event.op, event.position)
        after = protect.image(plan, event.after, aead, out_topic, event.schema_table, row_key, "after", subject,
                              event.op, event.position)
        value = self.emitter.change(event, subject, before, after, [*(p.name for p in plan.unclassified), *only_before],
                                    before_subject=None if before_subject == subject else before_subject)
        # Where each subject's ciphertexts went; none went anywhere without a key.
        if aead is not None:
            self.subject_activity[(subject, out_topic)] = plan.retention_s
        if before_subject != subject and before_aead is not None:
            self.subject_activity[(before_subject, out_topic)] = plan.retention_s
        if person is None:
            extra.extend(self.emitter.rows_without_subject(plan, topic))
        if out_key and self._is_compacted(out_topic):
            # Compaction keeps a key's latest record forever: remember whose it is, so that the subject's
            # erasure can write the tombstone that makes compaction remove it.
            self.keys.store.record_compacted_key(self.branch, subject, out_topic, partition, out_key)
        records = [OutRecord(out_topic, out_key, value, partition)]
        if person is not None:
            extra.extend(self._band_facts(event, person, where))
        images = (event.before is not None) + (event.after is not None)
        detail = None if write is None else write.as_dict()
        records.append(self.emitter.audit_for_plan(topic, partition, offset, plan, event.op, subject, decision,
                                                   images, aead is not None,
                                                   None if detail is None else write_reason(detail), only_before))
        if write is not None and detail is not None and not write.allowed:
            records.extend(self._write_not_allowed(write, detail, topic, partition, offset, event.schema_table,
                                                   records[0]))
        records.extend(extra)
        if plan.subject_root:
            self.root_topics.add(out_topic)
            if event.op != "d" and plan.relationship_end_column is not None and event.after is not None:
                end = relationship_end_s(event.after.get(plan.relationship_end_column))
                self.column_expiries[subject] = None if end is None else end + plan.retention_s
            if event.op == "d" and decision in ("protected", "erased_delete") and self.act_on_deletes:
                records.extend(self._root_deleted(plan, subject, event, (topic, partition, offset), out_topic,
                                                  decision))
        elif event.op == "d" and person is None and self.act_on_deletes:
            # A row without a data subject is its own subject: its delete destroys its per-row key (the
            # replay of a delete whose shred ran before a crash re-emits the pending confirmation).
            source = (topic, partition, offset)
            if decision == "protected":
                records.extend(self.erase(subject, trigger="row_delete", reason_code="row_deleted",
                                          reason="a row without a data subject was deleted in the branch database; "
                                                 "it was sealed under its own per-row key",
                                          by=f"worker:{self.settings.worker_id}",
                                          source=source, effective_ms=event.source_ts_ms))
            elif decision == "erased_delete":
                records.extend(self._already_erased(subject, trigger="row_delete", reason_code="row_deleted",
                                                    source=source))
        return Outcome(records, decision, event.schema_table, plan.class_counts)

    def _write_not_allowed(self, write: WriteDecision, detail: dict[str, Any], topic: str, partition: int,
                           offset: int, table: str, sanitized: OutRecord) -> list[OutRecord]:
        """A write the policy did not allow (its decision is in the change's own audit record): an anomaly,
        and the decision in the sanitized record's `bg-policy` header (the change happened in the branch
        database all the same)."""
        sanitized.headers = [*(sanitized.headers or []), (POLICY_HEADER, orjson.dumps(detail))]
        return [self.emitter.write_alert("write_denied" if write.decision == "deny" else "write_unattributed",
                                         table, (topic, partition, offset), detail)]

    def _attribution_message(self, event: ChangeEvent | None, topic: str, partition: int, offset: int) -> Outcome:
        """A record of the attribution topic (`<prefix>.message`): a PostgreSQL `guard.principal` message or a
        MariaDB `guard_admin.principal_messages` insert has its principal recorded for its transaction (the
        join of deletes) and an audit record; anything else there (another message, a tombstone) only the
        audit record `message_ignored`. Nothing goes to a sanitized topic (it holds no customer data)."""
        assert self.checker is not None
        principal = None if event is None else self.checker.record_message(event)
        detail = orjson.dumps({"tx_id": None if event is None else event.tx_id, "principal": principal,
                               "prefix": None if event is None else (event.message or {}).get("prefix"),
                               "table": None if event is None or event.op == "m" else event.schema_table}).decode()
        return Outcome([self.emitter.audit(topic, partition, offset, None, "m", None,
                                           "attribution" if principal is not None else "message_ignored", detail,
                                           {}, {})], "attribution", None)

    def _root_deleted(self, plan: TablePlan, subject: str, event: ChangeEvent, source: tuple[str, int, int],
                      out_topic: str, decision: str) -> list[OutRecord]:
        """What a delete of a subject's root row means: the table's `on_delete` in the catalog, nothing else.

        `erasure`: shred now (grace 0) or schedule it (`bg:{t}:erasure-due`; a re-insert before it is due
        cancels it at the commit); `relationship_end`: the retention runs from the delete; `none`: nothing;
        not configured: audited as such, no erasure (the guard never invents a reason). The replay of a
        delete whose shred ran before a crash (`erased_delete`) re-emits the pending confirmation.
        """
        od = plan.on_delete
        if decision == "erased_delete":
            return self._already_erased(subject, trigger="cdc_delete", reason_code=od.reason_code or od.meaning
                                        if od else "unconfigured", source=source)
        # A change of the root row after this delete (same batch) reads as a re-insert at the commit.
        self.subject_activity.pop((subject, out_topic), None)
        self._activity_seen = 0  # entries moved: the next `send_activity` looks at all of them again
        self.delete_expiries.pop(subject, None)
        self.column_expiries.pop(subject, None)
        now = self._clock()
        audit = self.emitter.audit
        if od is None:
            records = [audit(*source, event.schema_table, "erase", subject, "root_delete_unconfigured",
                             "no on_delete meaning in the catalog: not an erasure", {}, {})]
            if self.emitter.alert_once(f"root_delete_unconfigured:{event.schema_table}"):
                records.append(self.emitter.anomaly("root_delete_unconfigured", "medium", event.schema_table, None, {
                    "source": {"topic": source[0], "partition": source[1], "offset": source[2]},
                    "what": "a root row was deleted and the catalog does not say what that means; nobody was erased",
                    "suggested_action": f"set [tables.\"{event.schema_table}\".on_delete] in schemas/catalog.toml "
                                        "(meaning = erasure with a reason_code, relationship_end, or none)"}))
            return records
        if od.meaning == "none":
            return []
        if od.meaning == "relationship_end":
            ended = (event.source_ts_ms / 1000) if event.source_ts_ms else now
            self.delete_expiries[subject] = ended + plan.retention_s
            return [audit(*source, event.schema_table, "erase", subject, "retention_started",
                          f"relationship ended (root row deleted); erasure due after {plan.retention_s // 86_400} "
                          "days unless the row comes back", {}, {})]
        reason_code = od.reason_code or ""
        reason = f"{ERASURE_REASONS[reason_code]} (the root row was deleted in the branch database)"
        by = f"worker:{self.settings.worker_id}"
        # The root table's sanitized topic holds this delete (and maybe the row's insert of this transaction,
        # whose activity was just dropped and never reached the key store): the confirmation names it.
        if od.grace_s == 0:
            return self.erase(subject, trigger="cdc_delete", reason_code=reason_code, reason=reason, by=by,
                              source=source, topics=[out_topic], effective_ms=event.source_ts_ms)
        info = orjson.dumps({"trigger": "cdc_delete", "reason_code": reason_code, "reason": reason, "by": by,
                             "source": list(source), "effective_ms": event.source_ts_ms,
                             "scheduled_ms": int(now * 1000), "table": event.schema_table, "topics": [out_topic]})
        self.erasure_schedules.setdefault(subject, (now + od.grace_s, info))
        return [audit(*source, event.schema_table, "erase", subject, "erasure_scheduled",
                      f"{reason_code}; erased in {od.grace_s} s unless the root row comes back", {}, {})]

    def run_due_erasures(self, now: float | None = None, *, limit: int = 100) -> tuple[list[OutRecord], bool]:
        """Carry out up to `limit` scheduled erasures whose grace period is over (the runner calls this
        between transactions and writes the records in a transaction of their own): the records, and
        whether `limit` were claimed (more may be due)."""
        records: list[OutRecord] = []
        due = self.keys.store.due_erasures(self.branch, self._clock() if now is None else now, limit=limit)
        for subject, raw in due.items():
            info = orjson.loads(raw)
            records.extend(self.erase(subject, trigger=info.get("trigger", "cdc_delete"),
                                      reason_code=info["reason_code"], reason=info["reason"], by=info["by"],
                                      source=tuple(info["source"]) if info.get("source") else None,
                                      topics=[str(t) for t in info.get("topics") or []],
                                      effective_ms=info.get("effective_ms")))
        return records, len(due) >= limit

    def _truncate(self, event: ChangeEvent, topic: str, partition: int, offset: int, out_topic: str,
                  out_key: bytes | None) -> Outcome:
        """A TRUNCATE: forwarded, audited, and for a table whose rows are data subjects, an alert.

        A truncate names no row, so it erases nobody: a root table emptied in one statement (a maintenance
        reload, an operator's mistake, a purge after a transfer) is not an erasure of every customer in it.
        The audit record and a high-severity anomaly say so and name the table; erasing its customers takes
        an explicit `guard erase` per customer (docs/keys.md, "What is an erasure").
        """
        value = self.emitter.change(event, None, None, None, [])
        table = self.classifier.catalog.table(event.schema_table)
        root = table is not None and table.subject_root
        reason = ("root table truncated: no data subject erased; erase customers explicitly with guard erase"
                  if root else None)
        records = [OutRecord(out_topic, out_key, value, partition),
                   self.emitter.audit(topic, partition, offset, event.schema_table, event.op, None, "truncate",
                                      reason, {}, {})]
        if root:
            records.append(self.emitter.anomaly("root_table_truncated", "high", event.schema_table, None, {
                "source": {"topic": topic, "partition": partition, "offset": offset},
                "what": "TRUNCATE of a table whose rows are the data subjects; no customer was erased and no "
                        "deletion confirmation was written",
                "suggested_action": "if the customers must be erased, run `guard erase --subject ID --reason ... "
                                    "--by WHO` for each; otherwise check who truncated the table and why",
            }))
        return Outcome(records, "truncate", event.schema_table)

    def _fast_process(self, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes) -> Outcome | None:
        """The native path's outcome for a record, or None when it must take the Python path.

        Any exception in the native path (an erased subject, an unreachable key store, a value it can't
        read) also sends the event to the Python path, which meets the same condition and handles it
        with its full policy (DLQ, erasure rules, abort and retry); nothing is produced twice, because
        the native path returns its records instead of producing them.
        """
        out_topic = self.planner.sanitized_topic(topic)
        if self._is_compacted(out_topic):
            return None  # the Python path records the key for erasure tombstones
        try:
            out_key = self.sanitize_key(topic[self._prefix_len:], key)
            args = (value, topic, partition, offset, out_topic, out_key or b"", self.emitter.trace_id,
                    int(self._clock() * 1000))
            try:
                try:
                    done = self._fast.process(*args)
                except _KeyNotLoaded:
                    self._load_keys_from(topic, partition, offset, value)
                    done = self._fast.process(*args)
            finally:
                self.keys.count_lookups(*self._fast.take_key_counts())
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
        facts: list[OutRecord] = []
        if plan.schema_table in self._banded:
            try:
                event = self.decoder.decode(topic, partition, offset, value)
            except DecodeError:
                return None  # the Python path meets the same condition and decides it
            if event is not None and plan.subject_column and (event.after or {}).get(plan.subject_column) is not None:
                facts = self._band_facts(event, subject, (topic, partition, offset))
        self.subject_activity[(subject, out_topic)] = plan.retention_s
        return Outcome([OutRecord(out_topic, out_key, sanitized, partition),
                        OutRecord(self.settings.audit_topic, audit_key, audit_value), *facts],
                       "protected", plan.schema_table, plan.class_counts)

    def _band_facts(self, event: ChangeEvent, subject: str, source: tuple[str, int, int]) -> list[OutRecord]:
        """`transaction` facts of a new row whose banded columns reach a band (catalog `bands`): the band's
        name goes to the facts topic, never the value (docs/anomalies.md, "Transaction facts")."""
        bands = self._banded.get(event.schema_table)
        if not bands or event.op != "c" or event.after is None:
            return []
        when = event.source_ts_ms if event.source_ts_ms is not None else int(self._clock() * 1000)
        out = []
        for column, limits in bands:
            band = amount_band(event.after.get(column), limits)
            if band is not None:
                out.append(self.emitter.band_fact(source, event.schema_table, column, subject, band, when))
        return out

    def _is_compacted(self, out_topic: str) -> bool:
        """Whether a sanitized topic's cleanup.policy includes compact (memoised; refreshed with the
        value caches, every `key_cache_ttl`)."""
        compacted = self._compacted.get(out_topic)
        if compacted is None:
            configs = self.topic_configs(out_topic) or {}
            compacted = self._compacted[out_topic] = "compact" in configs.get("cleanup.policy", "")
        return compacted

    def _key_column(self, topic: str, column: str) -> Any:
        """How native runs carry a Kafka key column of the raw `topic` when they sanitize the key themselves
        (an object of integers and plain strings, `native/src/token.rs`): None in clear (the catalog allows
        it; `Protector.sanitize_key`'s rule for such values), else the column's `row_key` blind-index key
        as a `guard_native.TokenKey`."""
        policy = self.classifier.key_policy(topic[self._prefix_len:], column)
        if policy is not None and policy.action.value == "clear":
            return None
        return self.keys.index_for(column, "row_key").token_key

    def _fast_audit_parts(self, topic: str, partition: int, plan_id: int, op: str,
                          images: int) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
        """The constant parts of the native path's audit records (the same template as the Python path):
        `AuditTemplate.parts` and the record key."""
        template, record_key = self.emitter.audit_template(topic, partition, self._fast_plans[plan_id], op,
                                                           "protected", images, True)
        return (*template.parts, record_key)

    def _register_fast(self, plan: TablePlan) -> None:
        """Hand a plan the Python path has built to the native path (ordinary events of it go there next)."""
        self._fast_plans[id(plan)] = plan
        self._fast.register(
            id(plan), plan.schema_table, list(plan.columns), subject_column=plan.subject_column,
            # a relationship-end column is read by the Python path (`Sanitizer._sanitize_event`)
            usable=not plan.unclassified and plan.relationship_end_column is None,
            subject_root=plan.subject_root, clear=list(plan.clear),
            masks=list(plan.masks), index=list(plan.index), hashed=list(plan.hashed), dropped=list(plan.dropped),
            sealed=list(plan.sealed), retention_s=plan.retention_s,
            banded=[column for column, _ in self._banded.get(plan.schema_table, ())],
            index_keys=self._native_index_keys(plan))

    def _native_token_key(self, field: str, purpose: str) -> Any:
        """The native twin of a blind-index key (`BlindIndex.token_key`), with which the native path computes
        that field's tokens itself (the same keyed BLAKE2b, no call back into Python per distinct value);
        None if this key manager holds no index keys: the native path then calls back, which raises as the
        Python path does."""
        try:
            return self.keys.index_for(field, purpose).token_key
        except KeyUnavailableError:
            return None

    def _native_index_keys(self, plan: TablePlan) -> list[Any]:
        """Each index column's search key for the native path, or none at all (it then calls back)."""
        found = [self._native_token_key(column, "search") for column in plan.index]
        return found if all(key is not None for key in found) else []

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
        """Crypto-shred a data subject (or hold it storage-only) and return the records to write.

        The confirmation and its audit record are written into the key store in the same script as the
        shred (`bg:{t}:pending`), so they outlive a crash before the Kafka transaction commits: the replay of
        the same delete re-emits them (same id), and `SanitizerWorker` re-emits what no replay will
        (`guard.kafka.runner`), until a committed transaction carries them. Outcomes say what happened:
        `shredded` (keys destroyed), `no_keys` (the guard never held a key for the subject: nothing was
        sealed under one; the subject is marked erased all the same), `held_storage_only`, and for a
        subject erased before no new confirmation at all, only an `already_erased` audit record.
        """
        now_ms = int(self._clock() * 1000)
        confirmation_id = str(uuid.uuid4())
        view = self.keys.store.erasure_view(self.branch, subject)  # topics, key versions, compacted keys
        known_topics = sorted(set(topics or []) | {t for s, t in self.subject_activity if s == subject}
                              | view.topics)
        compacted = [view.compacted]  # for the first attempt; a retried shred (a rotation raced) reads again
        record = orjson.dumps({"id": confirmation_id, "at_ms": now_ms, "reason_code": reason_code, "by": by,
                               "trigger": trigger, "effective_ms": effective_ms or now_ms})
        built: list[OutRecord] = []

        def pending(versions: int, already: bool) -> bytes:
            # Compacted topics keep each key's latest record until a tombstone for the key is compacted in:
            # one for every key whose latest record is the subject's, carried (and re-emitted) with the
            # confirmation, whose `remains` says per topic what stays readable and until when.
            found = compacted.pop() if compacted else self.keys.store.compacted_keys(self.branch, subject)
            tombstones = [OutRecord(topic, key, None, partition) for topic, partition, key in found]
            remains = what_remains(known_topics, self.topic_configs, tombstones, now_ms, sealed=versions > 0)
            built[:] = [*self.emitter.deletion(
                subject, confirmation_id=confirmation_id, outcome="shredded" if versions else "no_keys",
                held=False, destroyed=versions, known_topics=known_topics, trigger=trigger,
                reason_code=reason_code, reason=reason, by=by, source=source, now_ms=now_ms, remains=remains),
                *tombstones]
            return pending_entry(confirmation_id, now_ms, self.owner, source, built, now_ms)

        held_built: list[OutRecord] = []

        def held() -> tuple[bytes, bytes]:
            # Under legal hold: the erasure deferred until the hold's release, and the held confirmation
            # pending like a shred's (delivered once, re-emitted after a crash), both written by the shred's
            # script with the hold check; the subject's schedule goes with it (it was confirmed again and
            # again, every lease, until the release).
            held_built[:] = self.emitter.deletion(
                subject, confirmation_id=confirmation_id, outcome="held_storage_only", held=True, destroyed=0,
                known_topics=known_topics, trigger=trigger, reason_code=reason_code, reason=reason, by=by,
                source=source, now_ms=now_ms)
            deferred = orjson.dumps({"id": confirmation_id, "at_ms": now_ms, "trigger": trigger,
                                     "reason_code": reason_code, "reason": reason, "by": by})
            return deferred, pending_entry(confirmation_id, now_ms, self.owner, source, held_built, now_ms)

        result = self.keys.shred(self.branch, subject, record, pending, preview=(view.versions, view.already_erased),
                                 held=held)
        if result.status == "held":
            self.pending_in_txn[subject] = confirmation_id
            return held_built
        if result.status == "done":
            # Not for `already`: a subject another process erased keeps what this transaction sealed for it
            # in view, so the commit's check (`KeyManager.erased_since`) aborts and replays the transaction
            # instead of committing what a stale cached key sealed after the erasure.
            self._drop_activity(subject)
            self.expire_value_caches(force=True)
            self.pending_in_txn[subject] = confirmation_id
            return built
        return self._already_erased(subject, trigger=trigger, reason_code=reason_code, source=source)

    def _already_erased(self, subject: str, *, trigger: str, reason_code: str,
                        source: tuple[str, int, int] | None) -> list[OutRecord]:
        """An erasure of a subject erased before: re-emit its pending confirmation if this is the replay of
        the change that wrote it, else no new confirmation, only an audit record naming the first one."""
        raw = self.keys.store.pending_confirmation(self.branch, subject)
        entry = orjson.loads(raw) if raw else None
        if entry is not None and source is not None and entry.get("source") == list(source) and raw is not None:
            # Claimed only if unchanged since read: a worker re-emitting it meanwhile (`Maintenance`) keeps it.
            claimed = orjson.dumps({**entry, "owner": self.owner, "claimed_ms": int(self._clock() * 1000)})
            if subject in self.keys.store.claim_pending(self.branch, {subject: (raw, claimed)}):
                self.pending_in_txn[subject] = entry["id"]
                return pending_records(entry)
        first = self.keys.store.erased_record(self.branch, subject)
        first_id = orjson.loads(first).get("id") if first else None
        where = source or ("erase", 0, 0)
        return [self.emitter.audit(where[0], where[1], where[2], None, "erase", subject, "already_erased",
                                   f"{reason_code} ({trigger}); erased before by confirmation {first_id}; "
                                   "no new confirmation", {}, {})]

    def _drop_activity(self, subject: str) -> None:
        """An erased subject's activity must not be recorded at the commit (it would set a new expiry)."""
        for pair in [p for p in self.subject_activity if p[0] == subject]:
            del self.subject_activity[pair]
            self._activity_recorded.discard(pair)
            self._activity_seen = 0  # entries moved: the next `send_activity` looks at all of them again


@dataclass(slots=True, frozen=True)
class _NativeHooks:
    """The sanitizer's side of `guard_native.FastPath.run` (see `Sanitizer.run_native`)."""

    out_topic: Callable[[str], str]
    sanitize_key: Callable[[str, bytes], bytes | None]
    key_column: Callable[[str, str], Any]
    load_keys: Callable[[str, int, int, bytes | None, int | None], None]
    key_not_loaded: type[Exception]
    activity: dict[tuple[str, str], int]
    audit_topic: str


class _KeyNotLoaded(Exception):
    """A data key is not in this worker's cache: load the batch's keys, then try again."""
