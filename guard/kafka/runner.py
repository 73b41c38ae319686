"""The sanitizer worker: an exactly-once consume-transform-produce loop on confluent-kafka.

Each batch of raw records is transformed and its outputs (sanitized, audit, alerts, deletions, DLQ) are
produced inside one Kafka transaction together with the consumed offsets, so downstream `read_committed`
consumers see every input's outputs exactly once, or not at all.

The parts that matter for "nothing lost, nothing duplicated":

- **Offsets are explicit**: the transaction commits `last processed offset + 1` per partition, never the
  consumer's position, which may run ahead of processing.
- **Abort rewinds**: when a transaction must be aborted, every partition of the batch is sought back to
  the first offset the batch processed, so the records are processed again, not skipped.
- **Rewinds are checked, not trusted**: `seek()` is asynchronous and, around a broker restart, was seen not
  to happen (the fetch went on from where it was, and records were skipped). The next record fetched from
  a rewound partition must be one the rewind went back over; if it is past them, or none comes, the
  worker rebuilds its clients and resumes from the committed offsets (`guard.kafka.rewinds`).
- **Rebalance**: partitions can only be revoked inside `consume()`, i.e. between batches; the revoke
  callback commits the open transaction while this worker still owns the partitions. If partitions are
  *lost* (the session expired), their progress is not ours to commit: the producer is replaced, which
  fences it and makes the coordinator abort its open transaction (waiting on an abort can take minutes
  after a broker restart). Nothing is sought: whoever gets the partitions next starts from the group's
  committed offsets.
- **Stuck calls**: transactional calls run under a deadline; a producer that doesn't answer is replaced
  and every partition of the batch is rewound to the group's committed offset.
- **Wedged clients**: if a recovery step itself fails (the coordinator doesn't answer an offset fetch, a
  new producer can't initialise, a fatal client error), the worker rebuilds both clients (the old
  consumer leaves the group, the new producer fences the old one) and resumes from the committed offsets,
  retrying with a back-off while the cluster is unreachable. The worker never exits on a Kafka failure,
  only on a stop request.
- **Out of the group**: a consumer with no member id for several session timeouts (stuck rejoining after
  a broker restart, seen once) is rebuilt with the producer, like a wedged client (`guard.kafka.membership`).
- **Fencing**: the transactional id is `<group>-<worker id>`. A restarted worker with the same id fences
  its crashed predecessor at `init_transactions()` and aborts its open transaction at once. Group
  metadata in `send_offsets_to_transaction` (KIP-447) fences zombies across rebalances too.
- **Key store outage**: `KeyUnavailableError` aborts the batch and retries it after a back-off, so an
  unreachable key store delays the stream but never sends plaintext and never fills the DLQ.
- **Erasures racing the batch**: before committing, the subjects whose keys sealed data in the
  transaction are checked against erasures that happened meanwhile (`KeyManager.erased_since`); if one
  was erased, the transaction is aborted and the replay meets the erasure. Root rows that came back
  cancel scheduled erasures before the commit.
- **Deletion confirmations**: written into the key store with each shred; a committed transaction that
  carries one removes it; between transactions (`guard.kafka.maintenance`, in transactions of their own) the
  worker re-emits those a crash left behind, carries out due erasures and finishes a due compaction.
- **Helper threads**: transactional calls and the consumer's close run on daemon threads
  (`guard.kafka.daemon_calls`), so a call librdkafka never returns from holds neither the loop nor the exit.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from guard.audit.writer import load_audit_signer
from guard.config import Settings
from guard.errors import KeyUnavailableError
from guard.kafka.abandoned import SetAside
from guard.kafka.audit_chain import AuditChains
from guard.kafka.batching import EarlyOffsets, commit_due, take
from guard.kafka.clients import OUTPUT_TOPIC_PARTITIONS, TopicManager, consumer_config, producer_config
from guard.kafka.daemon_calls import DaemonExecutor
from guard.kafka.evidence import prepare_evidence_topics
from guard.kafka.fetching import ACTIVE, NotFetchingWatch, fetch_states
from guard.kafka.fetching import alert_record as not_fetching_alert
from guard.kafka.hanging import Hanging, HangingReporter, HangingWatcher
from guard.kafka.maintenance import Maintenance, SideTransactionFailed
from guard.kafka.membership import MembershipWatch, subscription_matches
from guard.kafka.partitioning import group_offsets_partition
from guard.kafka.rewinds import RewindCheck, RewindLostError
from guard.kafka.side_alerts import SideAlerts
from guard.kafka.stats import BatchCounters, Stats
from guard.kafka_security import client_config
from guard.keys.manager import TxnMark
from guard.keys.store import PendingReply
from guard.pipeline.policy import AttributionPending
from guard.pipeline.sanitizer import Outcome, Sanitizer
from guard.protect.fastpath import take_messages
from guard.records.builders import OutRecord
from guard.telemetry import Telemetry

log = logging.getLogger("guard.runner")

#: How often librdkafka hands the worker its consumer's statistics (each partition's fetch state, the lag).
STATISTICS_INTERVAL_MS = 5000

#: How often a worker looks for deletion confirmations left pending by a crash, due erasures and a due
#: compaction (`_maintenance`: three key-store round trips).
PENDING_CHECK_S = 5.0

#: The timeout the offsets sent early to a transaction get (`EarlyOffsets`): librdkafka answers a timed-out
#: send with a retriable error, and the commit then sends the offsets itself.
OFFSETS_SEND_TIMEOUT_S = 10.0
#: How long the commit waits for its offsets send before it calls the producer stuck and replaces it
#: (`_recover`): the send answers within its timeout, plus a margin. librdkafka can leave a coordinator request
#: unanswered past its timeout when the coordinator moved or restarted (confluentinc/librdkafka issues 5456 and
#: 5511): after a broker restart both workers of the reliability test waited out the whole transaction deadline
#: (45 s) here before. Until the thirty-third session it was twice the timeout plus the margin, from when each
#: batch sent its offsets too and the commit's send could queue behind one on the helper thread; since batches
#: send none (`_process_batch`) nothing is queued before it, and each broker outage that left a send unanswered
#: stalled the worker 10 s longer than it had to.
EARLY_SEND_STUCK_S = OFFSETS_SEND_TIMEOUT_S + 5.0


def tune_gc(batch_size: int) -> None:
    """Keep the cyclic garbage collector off the hot path; reference counting frees a batch's objects.

    A fetched batch holds a few objects per record (the Message, the runner's tuples) until it is done.
    With CPython's default threshold (700 allocations) the collector ran several times per batch, each
    time walking the live batch and promoting it towards the oldest generation, whose full walks cover
    every cache: 9% of a worker's time. A threshold above a batch's live objects lets the batch die by
    reference count first; the objects built at start-up (catalog, plans, clients) are frozen out of the
    walks altogether. Garbage cycles are still collected, only less often.
    """
    gc.collect()
    gc.freeze()
    threshold0, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(max(threshold0, 10 * batch_size), threshold1, threshold2)


class ProducerStuckError(Exception):
    """A transactional producer call did not return within its deadline."""


class SanitizerWorker:
    """Runs the sanitizer over the branch's raw topics until stopped."""

    def __init__(self, settings: Settings, sanitizer: Sanitizer, *, on_batch: Callable[[Stats], None] | None = None,
                 telemetry: Telemetry | None = None):
        self.settings = settings
        self.sanitizer = sanitizer
        self.stats = Stats()
        self.batch = BatchCounters()
        self.telemetry = telemetry or Telemetry(settings)
        self._on_batch = on_batch
        self._running = True
        self.admin = AdminClient(client_config(settings))
        self.topics = TopicManager(self.admin)
        sanitizer.topic_configs = self.topics.configs  # compacted topics, retention in confirmations
        client_id = f"guard-{settings.worker_id}"
        self._consumer_config: dict[str, Any] = {
            **consumer_config(settings, client_id),
            # A pattern subscription: new raw topics (tables created later) are noticed within 3 s.
            "topic.metadata.refresh.interval.ms": 3000,
            # Always on: the fetch states are how a partition held but never fetched is found (`_watch_fetching`).
            "statistics.interval.ms": STATISTICS_INTERVAL_MS,
            "stats_cb": self._on_consumer_stats,
        }
        self.consumer = Consumer(self._consumer_config)
        #: A consumer out of its group for several session timeouts is rebuilt (`guard.kafka.membership`).
        self._membership = MembershipWatch.for_session_timeout(int(self._consumer_config["session.timeout.ms"]))
        #: Assigned partitions that never start fetching are alerted (`guard.kafka.fetching`), with the
        #: hanging-transaction watch's limit: no working producer's transaction stays open longer.
        self._fetching = NotFetchingWatch(settings.stuck_after_s)
        #: Each partition's fetch state in the consumer's latest statistics (None: none since the subscribe).
        self._fetch_states: dict[tuple[str, int], str] | None = None
        #: The watches' alerts, sent outside the worker's transactions (`guard.kafka.side_alerts`).
        self._side_alerts = SideAlerts(
            client_config(settings, **{"enable.idempotence": True, "client.id": f"guard-{settings.worker_id}-alerts"}),
            settings.anomalies_topic, partitions_of=self.topics.partitions)
        self._subscription: list[str] = []
        self._producer_config = producer_config(settings, client_id)
        #: Outputs larger than this take the Python path, which turns librdkafka's MSG_SIZE_TOO_LARGE into a
        #: DLQ record (the margin covers librdkafka's per-record overhead in its size check).
        self._max_record_bytes = int(self._producer_config.get("message.max.bytes", 1_000_000)) - 1024
        self.producer = Producer(self._producer_config)
        #: Clients given up on: not destroyed on this thread, at most a few kept (`guard.kafka.abandoned`).
        self._abandoned = SetAside()
        self._txn_pool = DaemonExecutor("bg-txn")
        #: Longest a transactional call may take, its retries included, before the producer is replaced.
        self._txn_deadline_s = settings.transaction_timeout_ms / 1000 + 15
        self._in_txn = False
        self._first: dict[tuple[str, int], int] = {}
        self._last: dict[tuple[str, int], int] = {}
        #: Partitions of the batch in hand held back at a delete waiting for its attribution message: the
        #: delete and what follows it are sought back and fetched again (`_hold`).
        self._held: dict[tuple[str, int], int] = {}
        #: Every seek back is checked by the next record fetched (`guard.kafka.rewinds`).
        self._rewinds = RewindCheck()
        self._early_offsets = EarlyOffsets()
        self._txn_started = 0.0
        self._txn_records = 0
        self._watcher: HangingWatcher | None = None
        #: (number of checkpoints, reply) of the last copy to the second store not read yet (`_chains_committed`)
        self._checkpoint_copy: tuple[int, PendingReply] | None = None
        #: This incarnation's name in pending confirmations (transactional id + a fresh uuid).
        sanitizer.owner = f"{settings.transactional_id()}#{uuid.uuid4()}"
        self._txn_mark: TxnMark = sanitizer.keys.mark()
        self._pending_checked = 0.0
        #: Scheduled erasures and pending confirmations, between the stream's transactions.
        self._upkeep = Maintenance(settings, sanitizer, self.stats, write=self._side_transaction)
        # The audit chains (docs/audit.md): no signing key, no worker (fail closed).
        signer = load_audit_signer(settings)
        sanitizer.emitter.signer = signer
        self.chains = AuditChains(settings, signer, sanitizer.emitter.checkpoint,
                                  lambda tps: self.consumer.committed(tps, timeout=30))
        self._idle_checked = 0.0

    # --- lifecycle --------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def prepare_output_topics(self) -> None:
        s = self.settings
        prepare_evidence_topics(self.admin, s, OUTPUT_TOPIC_PARTITIONS)
        for topic in (s.audit_topic, s.anomalies_topic, s.deletions_topic, s.dlq_topic, s.facts_topic):
            self.topics.ensure(topic, OUTPUT_TOPIC_PARTITIONS)

    def run(self, *, max_idle_s: float | None = None, until: Callable[[Stats], bool] | None = None) -> Stats:
        """Process until stopped (SIGTERM), until `until(stats)` is true, or after `max_idle_s` idle."""
        self.prepare_output_topics()
        log.info("worker %s starting: group %s, %s hot path", self.settings.worker_id, self.settings.group_id,
                 self.sanitizer.hot_path)
        self._txn("init", lambda: self.producer.init_transactions(10))
        self._subscribe()
        self._maintenance()
        self._watcher = self._start_hanging_watch()
        tune_gc(self.settings.batch_size)
        backoff = 0.5
        idle_since = time.monotonic()
        window = self.settings.batch_ms / 1000
        stopped = False  # the loop ended as asked (a stop, `until`, idle), not by an unexpected error
        try:
            while self._running:
                msgs: list[Message] = []
                try:
                    limit = max(1, self.settings.batch_size - self._txn_records)
                    msgs, drained = take(self.consumer, limit, 0 if self._in_txn else window)
                    if msgs:
                        idle_since = time.monotonic()
                        self._process_batch(msgs)
                    if self._rewinds:  # a rewound partition that fetches nothing, busy with others or idle
                        self._rewinds.check_overdue()
                    if self._in_txn and commit_due(drained=drained, records=self._txn_records,
                                                   batch_size=self.settings.batch_size,
                                                   age_s=time.monotonic() - self._txn_started, batch_s=window):
                        self._commit()
                    if not self._in_txn and time.monotonic() - self._pending_checked > PENDING_CHECK_S:
                        self._maintenance()
                    elif not self._in_txn and self._upkeep.erasures_waiting:
                        self._run_due_erasures()  # the next batch of a backlog, between stream transactions
                    if not self._in_txn and time.monotonic() - self._idle_checked > min(
                            PENDING_CHECK_S, self.settings.audit_checkpoint_s / 2):
                        self._idle_checkpoints()
                    if self._membership.due():
                        if self._out_of_group():
                            self._rebuild_clients()
                            continue
                        self._watch_fetching()
                    backoff = 0.5
                except KeyUnavailableError as exc:
                    log.warning("key store unavailable, retrying the batch in %.1fs: %s", backoff, exc)
                    self._abort()
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                except (KafkaException, ProducerStuckError) as exc:
                    log.error("Kafka client failure (%s); rebuilding the clients, resuming from the committed "
                              "offsets", exc)
                    self._rebuild_clients()
                    continue
                except RewindLostError as exc:
                    log.warning("%s; rebuilding the clients, resuming from the committed offsets", exc)
                    self.stats.lost_rewinds += 1
                    self._rebuild_clients()
                    continue
                if until is not None and until(self.stats):
                    break
                if max_idle_s is not None and not msgs and time.monotonic() - idle_since > max_idle_s:
                    break
            stopped = True
        finally:
            self._end_open_transaction(stopped)
            if not self._in_txn:
                # A clean stop anchors its last records: without it they would wait, unverifiable by a
                # checkpoint, until another worker owns their partitions (docs/audit.md).
                self._idle_checkpoints(final=True)
            self._checkpoint_copy_done()
            if self._watcher is not None:
                self._watcher.stop()
            # A rewrite still waiting for its window (`aof_compaction_delay_s`) is done now rather than left
            # to the next worker's start: the confirmations say it starts within the window.
            if not self.sanitizer.keys.finish_compaction(timeout_s=30):
                log.warning("the append-only-file rewrite after this worker's shreds did not complete before it "
                            "stopped; the key store keeps it due (bg:{t}:compact-shreds above compact-covered) "
                            "and the next worker does it")
            self._close_consumer(self.consumer)
            try:
                self.producer.flush(10)
            except KafkaException as exc:
                log.warning("producer flush at exit failed (%s)", exc)
            self.telemetry.shutdown()
        return self.stats

    def _end_open_transaction(self, stopped: bool) -> None:
        """At exit: commit the open transaction after a stop, abort it after an unexpected error.

        An error can leave a batch half done: a native run that produced records and raised before it
        returned them. Committing then wrote outputs without their input offsets, and the restarted worker
        met the same record again (and wrote the outputs again). Aborted, the next owner reprocesses the
        batch from the committed offsets; an abort that can't finish leaves it to the transaction timeout."""
        if not self._in_txn:
            return
        if not stopped:
            log.error("stopping on an unexpected error with a transaction open: aborting it; the next owner "
                      "reprocesses its records from the committed offsets")
            self._abort_side_transaction()
            return
        try:
            self._commit()
        except (KafkaException, KeyUnavailableError, ProducerStuckError) as exc:
            log.warning("final commit failed (%s); the next owner reprocesses the open batch", exc)

    def _output_partitions(self) -> list[tuple[str, int]]:
        """What the hanging-transaction watch covers: every output partition, and the group's offsets."""
        s = self.settings
        out = [tp for topic in (s.audit_topic, s.anomalies_topic, s.deletions_topic, s.dlq_topic, s.facts_topic)
               for tp in self.topics.known(topic) if tp[0] == topic]
        out += self.topics.known(s.sanitized_prefix)
        offsets_partitions = self.topics.partitions("__consumer_offsets")
        if offsets_partitions:
            out.append(("__consumer_offsets", group_offsets_partition(s.group_id, offsets_partitions)))
        return out

    def _start_hanging_watch(self) -> HangingWatcher:
        s = self.settings
        reporter = HangingReporter(self._side_alerts, branch=s.branch, worker=s.worker_id, on_count=self._on_hanging)
        return HangingWatcher(self.admin, self._output_partitions, reporter,
                              limit_s=s.stuck_after_s).start()

    def _on_hanging(self, hanging: list[Hanging]) -> None:
        self.telemetry.on_hanging({f"{h.topic}[{h.partition}]": h.high_watermark - h.last_stable for h in hanging})

    def _subscribe(self) -> None:
        topics = [self.settings.raw_topic_pattern]
        if self.sanitizer.checker is not None:
            # The logical decoding messages that attribute deletes (docs/policy.md, "Attribution contract").
            topics.append(self.sanitizer.checker.message_topic)
        self.consumer.subscribe(topics, on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._subscription = topics
        self._membership.restart()
        self._fetching.restart()
        self._fetch_states = None

    def _out_of_group(self) -> bool:
        """Whether the consumer has had no member id for too long (`guard.kafka.membership`): it is rebuilt."""
        out_for = self._membership.stuck(self.consumer.memberid())
        if out_for is None:
            return False
        # No topic to read yet (e.g. before Debezium creates the branch's): such a consumer never joins. An
        # unreachable cluster raises here, and `run()` rebuilds the clients as for any Kafka failure.
        if not subscription_matches(self._subscription, self.consumer.list_topics(timeout=10).topics):
            self._membership.restart()
            return False
        log.error("the consumer has not been a member of group %s for %.0f s (limit %.0f s): the cluster is "
                  "unreachable, or the client is stuck rejoining (librdkafka issues 2944, 3396); rebuilding the "
                  "clients, resuming from the committed offsets", self.settings.group_id, out_for,
                  self._membership.limit_s)
        self.stats.membership_rebuilds += 1
        return True

    def _on_consumer_stats(self, text: str) -> None:
        """librdkafka's statistics (on the loop's thread, inside `consume`): fetch states, and the metrics."""
        try:
            stats = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        self._fetch_states = fetch_states(stats)
        self.telemetry.on_stats(stats)

    def _fetching_partitions(self) -> list[tuple[str, int]]:
        """Assigned partitions the consumer fetches, per its latest statistics. The others wait for their
        committed offsets: reading their audit tails (the same offset fetch) would block for its timeout."""
        states = self._fetch_states or {}
        assigned = ((tp.topic, tp.partition) for tp in self.consumer.assignment())
        return [tp for tp in assigned if states.get(tp) == ACTIVE]

    def _watch_fetching(self) -> None:
        """Partitions held but not fetched for longer than the limit are reported once (`guard.kafka.fetching`)."""
        assigned = [(tp.topic, tp.partition) for tp in self.consumer.assignment()]
        finding = self._fetching.observe(assigned, self._fetch_states)
        for (topic, partition), without_s in self._fetching.take_resolved():
            log.warning("%s[%d] is fetched again, after %.0f s without", topic, partition, without_s)
        self.telemetry.on_not_fetching(self._fetching.overdue())
        if finding is None:
            return
        s = self.settings
        try:
            count = self.topics.partitions("__consumer_offsets")
        except KafkaException:  # the cluster does not answer: the alert says "the group's partition"
            count = None
        offsets = f"__consumer_offsets[{group_offsets_partition(s.group_id, count)}]" if count else None
        log.error("the consumer of group %s holds partitions it does not fetch (%s; limit %.0f s): the group's "
                  "committed offsets can't be read (pending in a transaction, %s) or the partitions' leaders "
                  "are unreachable; alerting on %s", s.group_id, finding.describe(), self._fetching.limit_s,
                  offsets, s.anomalies_topic)
        key, value = not_fetching_alert(finding, group=s.group_id, offsets_partition=offsets,
                                        member_id=self.consumer.memberid() or "", branch=s.branch,
                                        worker=s.worker_id, now=time.time())
        try:
            self._side_alerts.send(key, value)
        except (KafkaException, BufferError) as exc:  # the error line above stays; the loop goes on
            log.error("the partitions_not_fetching alert could not be sent to %s: %s", s.anomalies_topic, exc)

    # --- one batch --------------------------------------------------------------------------------
    def _process_batch(self, msgs: list[Message]) -> None:
        """Sanitize and produce one fetched batch inside the open transaction (this loop runs per event)."""
        sanitizer = self.sanitizer
        traced = self.telemetry.tracer is not None
        first, last = self._first, self._last
        # Rewind points first: if any record of this batch fails (e.g. the key store is down), the abort
        # must seek back every partition the batch touched, including the ones not reached yet.
        good: list[tuple[Message, str, int, int, bytes | None]] = []
        ends = dict(last)  # where the transaction's offsets will stand once this batch is done
        # With the native path, its `take_messages` does this loop up to each message with an error.
        native_take = take_messages if sanitizer.runs_native and isinstance(msgs, list) else None
        i, n = 0, len(msgs)
        while i < n:
            if native_take is not None:
                i = native_take(msgs, i, good, first, ends)
                if i == n:
                    break
            msg = msgs[i]
            i += 1
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer error: %s", err)
                continue
            # A message without an error always has its topic, partition and offset.
            topic: str = msg.topic()  # type: ignore[assignment]
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            if (topic, partition) not in first:
                first[(topic, partition)] = offset
            ends[(topic, partition)] = offset
            good.append((msg, topic, partition, offset, msg.value()))
        if self._rewinds:
            self._rewinds.confirm(good)
        if not good:
            return
        sanitizer.prefetch([(topic, partition, offset, value) for _, topic, partition, offset, value in good])
        if not self._in_txn:
            self.producer.begin_transaction()  # local to the client: no broker round trip, nothing to wait for
            self._txn_mark = sanitizer.keys.mark()
            self._in_txn = True
            self._txn_started = time.monotonic()
            self._txn_records = 0
        # The audit chains of partitions new to this worker, read with their committed offsets *before* this
        # transaction sends offsets for them: a read_committed offset fetch waits on pending offsets.
        # No offsets are sent here: they go to the transaction once, at the commit, with the chains' tails
        # as their metadata (`_commit`). A send of the batch's offsets here, without tails, was always
        # superseded by the commit's and made each transaction pay two sends; at half rate the commit's
        # often queued behind it on the transactional thread (docs/benchmark.md, issue 17's latency trace).
        unloaded = [tp for tp in ends if tp not in self.chains.partitions]
        if unloaded:
            self.chains.load(unloaded)
        self._held.clear()
        if sanitizer.runs_native and not traced:
            # Ordinary records are sanitized and produced natively; each record a run stops at (declined,
            # headers to carry, too large, a callback error) goes through the full Python path.
            i, n = 0, len(good)
            producer = self.producer
            try:
                while i < n and not self._held:
                    # The run chains its audit records itself (`chains`: leaf hashes computed where the bytes
                    # are built); sanitized records go straight to the producer.
                    run = sanitizer.run_native(good, i, produce=producer.produce, poll=producer.poll,
                                               partitions=self.topics.ensure_like,
                                               max_record_bytes=self._max_record_bytes, chains=self.chains)
                    for topic, partition, offset in run.last:
                        last[(topic, partition)] = offset
                    self.batch.add_run(run)
                    i = run.end
                    if i < n:
                        self._process_one(*good[i], traced)
                        i += 1
            finally:
                sanitizer.forget_batch()
            # A partition held back: the rest of the batch takes the Python path, which skips its records.
            for record in good[i:]:
                self._process_one(*record, traced)
        else:
            for msg, topic, partition, offset, value in good:
                self._process_one(msg, topic, partition, offset, value, traced)
        if self._held:
            self._hold()
        self._txn_records += len(good)
        self.producer.poll(0)

    def _hold(self) -> None:
        """Seek each held partition back to its waiting delete, so it is fetched again with what follows it.

        Nothing of a held partition after the delete was processed, and its committed offset stays before
        the delete, so exactly-once holds; the wait is bounded (`attribution_wait_s`, then the delete is
        decided `unattributed`). A short pause keeps a worker whose whole batch waits from spinning.
        """
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for (topic, partition), offset in self._held.items():
            if (topic, partition) in assigned:
                self._seek_back(topic, partition, offset, offset)
            # Commit exactly up to the delete: the commit sends the offsets from `_last` (nothing of the
            # partition past the delete was sent before).
            self._last[(topic, partition)] = offset - 1
        self.stats.attribution_waits += len(self._held)
        time.sleep(0.05)

    def _process_one(self, msg: Message, topic: str, partition: int, offset: int, value: bytes | None,
                     traced: bool) -> None:
        """Sanitize one record with `Sanitizer.process` and produce its outputs (the full Python path)."""
        if (topic, partition) in self._held:
            return  # after a delete waiting for its attribution: fetched again with it
        sanitizer, telemetry = self.sanitizer, self.telemetry
        headers = msg.headers()
        if traced or headers:
            span, out_headers, trace_id = telemetry.start_event(headers, topic, partition, offset)
        else:
            span = out_headers = trace_id = None
        try:
            outcome = sanitizer.process(topic, partition, offset, msg.key(), value, trace_id)
        except AttributionPending:
            self._held[(topic, partition)] = offset
            if span is not None:
                telemetry.end_event(span, None, "attribution_pending")
            return
        if span is not None:
            telemetry.end_event(span, outcome.table, outcome.decision)
        # Outputs keep the change's timestamp: downstream sees when it happened, and end-to-end
        # latency is measurable on the sanitized topic.
        ts_type, ts = msg.timestamp()
        ts = ts if ts_type != TIMESTAMP_NOT_AVAILABLE else 0
        try:
            self._produce_all(outcome, topic, ts, out_headers, (topic, partition))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            outcome = sanitizer.too_large(topic, partition, offset, msg.key(), value)
            self._produce_all(outcome, topic, ts, out_headers, (topic, partition))
        self._last[(topic, partition)] = offset
        self.batch.add(outcome, ts)

    def _early_offsets_cover_batch(self) -> bool:
        """Whether the offsets sent while the batch ran are exactly the ones this commit needs."""
        try:
            return self._early_offsets.cover(self._last, EARLY_SEND_STUCK_S)
        except concurrent.futures.TimeoutError:
            raise ProducerStuckError(f"transactional send offsets (timeout {OFFSETS_SEND_TIMEOUT_S:.0f} s) still "
                                     f"unanswered {EARLY_SEND_STUCK_S:.0f} s into the commit") from None

    def _produce_all(self, outcome: Outcome, source_topic: str, ts: int, headers: Any,
                     source: tuple[str, int] | None) -> None:
        """Produce an outcome's records; audit and deletion records join the chain of `source` (the input
        partition; None: this worker's side chain), stamped once before any retry."""
        produce = self.producer.produce
        chained = self.chains.kinds
        for rec in outcome.records:
            partition = -1  # librdkafka's "use the partitioner"
            if rec.partition is not None:
                partition = rec.partition % self.topics.ensure_like(rec.topic, source_topic)
            both = headers if rec.headers is None else [*(headers or []), *rec.headers]
            out_headers = both
            if rec.topic in chained:
                out_headers = self.chains.headers(rec.topic, rec.key, rec.value, source, both)
            while True:
                try:
                    produce(rec.topic, rec.value, rec.key, partition=partition,
                            timestamp=ts if rec.timestamp is None else rec.timestamp, headers=out_headers)
                    break
                except BufferError:  # local queue full: let deliveries drain, then retry
                    self.producer.poll(0.2)

    def _produce_own(self, rec: OutRecord) -> None:
        """A record of the guard's own transactions (erasures, re-emitted confirmations): an erasure's
        tombstones go to the partition of the record they remove, everything else by the partitioner."""
        headers = self.chains.headers(rec.topic, rec.key, rec.value, None, rec.headers)
        self.producer.produce(rec.topic, rec.value, rec.key, partition=-1 if rec.partition is None else rec.partition,
                              timestamp=rec.timestamp or 0, headers=headers)

    def _produce_checkpoints(self, records: list[OutRecord]) -> None:
        """Checkpoint records (not leaves themselves) into the open transaction."""
        for rec in records:
            self.producer.produce(rec.topic, rec.value, rec.key, timestamp=rec.timestamp or 0, headers=rec.headers)

    def _chains_committed(self) -> None:
        """After a commit: the checkpoints it carried go to the second store too (best effort: the topic
        has them; a checkpoint missing from the second store weakens only what a later cut can hide).

        The copy is sent now and its reply read at the next commit's copy (or when the worker stops): nothing
        waits on it, and waiting for it right away was ~3% of a first-sight worker's time (docs/benchmark.md,
        round 22)."""
        self._checkpoint_copy_done()
        notes = self.chains.committed()
        if notes:
            self._checkpoint_copy = (len(notes), self.sanitizer.keys.store.send_audit_checkpoints(
                self.settings.audit_topic, notes))

    def _checkpoint_copy_done(self) -> None:
        """Read the reply of the last copy of checkpoints to the second store; a failure is logged."""
        pending, self._checkpoint_copy = self._checkpoint_copy, None
        if pending is None:
            return
        count, reply = pending
        try:
            reply.result()
        except KeyUnavailableError as exc:
            log.warning("%d audit checkpoints not copied to the second store (%s); they are on %s",
                        count, exc, self.settings.audit_topic)

    def _idle_checkpoints(self, *, final: bool = False) -> None:
        """Between transactions: checkpoints of the chains whose last one is `audit_checkpoint_s` old, in a
        transaction of their own, so a quiet chain is still checkpointed every T seconds. `final`: at a clean
        stop, every chain that grew since its last checkpoint (`AuditChains.checkpoints`)."""
        self._idle_checked = time.monotonic()
        try:
            if not final:
                self.chains.load(self._fetching_partitions())
            records = self.chains.checkpoints(idle=True, final=final)
            if not records:
                return
            self.producer.begin_transaction()
            self._in_txn = True
            self._produce_checkpoints(records)
            self._txn("commit", lambda: self.producer.commit_transaction(10))
            self._in_txn = False
            self._chains_committed()
        except (KafkaException, ProducerStuckError) as exc:
            log.warning("idle audit checkpoints not written (%s); retrying later", exc)
            self._abort_side_transaction()

    def _commit(self) -> None:
        if not self._in_txn:
            return
        if not self._last:
            self._abort()
            return
        try:
            sanitizer = self.sanitizer
            # Where the batch's ciphertexts went: the rest of it sent first (native runs sent the earlier part
            # while they ran: `Sanitizer.send_activity`), so the key store writes it while this commit does
            # the work below; every write of the batch is waited for before the commit (`activity_written`).
            sanitizer.send_activity()
            # The chains' checkpoints, and the offsets with the chains' tails as their metadata, sent while
            # the key store is asked below: the tails commit atomically with the records (docs/audit.md).
            self._produce_checkpoints(self.chains.checkpoints())
            tails = self.chains.metadata(self._last)
            self._early_offsets.send(self._txn_pool, self.producer, self.consumer, self._last,
                                     OFFSETS_SEND_TIMEOUT_S, tails)
            store = sanitizer.keys.store
            # scheduled before the view is read (one round trip): a re-insert later in the batch must find its
            # erasure scheduled to cancel it
            epoch, watched = store.commit_view(sanitizer.branch, sanitizer.take_erasure_schedules())
            stale = sanitizer.keys.erased_since(self._txn_mark, sanitizer.branch,
                                                {subject for subject, _ in sanitizer.subject_activity}, epoch)
            if stale:
                # Data of these subjects was sealed with a cached key that an erasure (by another worker
                # or `guard erase`) destroyed meanwhile: never commit it. The replay meets the erasure.
                log.warning("%d data subjects of this transaction were erased while it ran; aborting it so "
                            "their changes are processed again after the erasure", len(stale))
                self.stats.erased_during_txn += len(stale)
                self._abort()
                return
            roots = sanitizer.root_changes()
            # Root rows that exist again: cancel their scheduled erasures and stopped relationships, before
            # the commit (a crash after it must not leave a re-inserted customer to be shredded); then the
            # batch's retention expiries, in the same script call.
            cancelled, resumed = store.root_changed(sanitizer.branch, roots if watched else [],
                                                    sanitizer.take_expiries(roots))
            if roots and watched:
                self._produce_root_audits(cancelled, resumed)
                self._produce_checkpoints(self.chains.checkpoints())  # the side chain's, if it grew
            # every activity write of the batch waited for (a send here finds nothing new unless the Python
            # work above added pairs)
            sanitizer.send_activity()
            sanitizer.activity_written()
            if not self._early_offsets_cover_batch():
                offsets = [TopicPartition(t, p, o + 1, tails[(t, p)]) for (t, p), o in self._last.items()]
                metadata = self.consumer.consumer_group_metadata()
                self._txn("send offsets", lambda: self.producer.send_offsets_to_transaction(offsets, metadata, 10))
            self._txn("commit", lambda: self.producer.commit_transaction(10))
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.txn_requires_abort():
                # Not `abort_transaction()` and the same producer: after a coordinator moved or restarted,
                # librdkafka may have missed the answer to an AddPartitionsToTxn the broker did apply; it then
                # aborts locally, without EndTxn, and the broker's transaction, records included, stays open
                # and is committed by this producer's next transaction (same epoch). Seen once in the
                # broker-outage test: an input decided twice. A new producer (init_transactions: a new epoch)
                # makes the coordinator abort whatever that transaction holds.
                log.warning("transaction must be aborted (%s); replacing the producer so the broker's side of it "
                            "is aborted too, and processing the batch again", error)
                self._recover()
                return
            log.error("commit failed (%s); replacing the producer and rewinding to the committed offsets", error)
            self._recover()
            return
        except ProducerStuckError as exc:
            log.error("%s; replacing the producer and rewinding to the committed offsets", exc)
            self._recover()
            return
        except KeyUnavailableError:
            self._abort()
            raise
        self._confirm_delivered(self.sanitizer.pending_in_txn)
        self.sanitizer.subject_activity.clear()
        self._chains_committed()
        batch, self.batch = self.batch, BatchCounters()
        self.stats.merge(batch)
        log.debug("committed a transaction of %d events over %d partitions", batch.events, len(self._last))
        self.telemetry.on_commit(batch.by_table_decision, batch.fields, batch.dlq, batch.records_out,
                                 batch.timestamps_ms)
        self._reset_batch()
        if self._on_batch is not None:
            self._on_batch(self.stats)

    def _produce_root_audits(self, cancelled: list[str], resumed: list[str]) -> None:
        """Audit records, in the open transaction, for erasures and retentions a re-insert cancelled."""
        emit = self.sanitizer.emitter.audit
        for subject in cancelled:
            self._produce_all(Outcome([emit("erase", 0, 0, None, "erase", subject, "erasure_cancelled",
                                            "the root row came back within the grace period", {}, {})], "audit"),
                              "", 0, None, None)
        for subject in resumed:
            self._produce_all(Outcome([emit("erase", 0, 0, None, "erase", subject, "retention_stopped",
                                            "the root row came back: the relationship continues", {}, {})], "audit"),
                              "", 0, None, None)

    def _maintenance(self) -> None:
        """Between transactions, every `PENDING_CHECK_S`: finish a compaction left due, deliver pending
        confirmations, carry out the erasures whose grace period is over (`guard.kafka.maintenance`)."""
        self._pending_checked = time.monotonic()
        if self._in_txn:
            return
        self._upkeep.run()

    def _run_due_erasures(self) -> None:
        self._upkeep.run_due_erasures()

    def _confirm_delivered(self, carried: dict[str, str]) -> None:
        self._upkeep.confirm_delivered(carried)

    def _side_transaction(self, records: list[OutRecord]) -> None:
        """The guard's own records (an erasure's, re-emitted confirmations) in a transaction of their own, with
        the chains' checkpoints; committed when this returns. When Kafka fails it (an error, a stuck call) it
        is ended here (`_abort_side_transaction`) and `SideTransactionFailed` raised."""
        try:
            self.producer.begin_transaction()
            self._in_txn = True
            for rec in records:
                self._produce_own(rec)
            self._produce_checkpoints(self.chains.checkpoints())
            self._txn("commit", lambda: self.producer.commit_transaction(10))
        except (KafkaException, ProducerStuckError) as exc:
            self._abort_side_transaction()
            raise SideTransactionFailed(str(exc)) from exc
        self._in_txn = False
        self._chains_committed()

    def _abort_side_transaction(self) -> None:
        """End a maintenance transaction (scheduled erasures, re-emitted confirmations) that failed.

        It carries no consumed records, so nothing is rewound; a producer that can't abort is replaced,
        which fences it and has the coordinator abort the transaction. Its commit may have gone through
        (a commit call that got stuck): the side chains are not rolled back to reuse sequence numbers the log
        may already hold, new ones begin (`AuditChains.reset(outcome_unknown=True)`), and the partition
        chains are read again from the committed tails.
        """
        self.chains.reset(outcome_unknown=True)
        if not self._in_txn:
            return
        self._in_txn = False
        try:
            self._txn("abort", lambda: self.producer.abort_transaction(5), deadline_s=10)
        except (KafkaException, ProducerStuckError):
            self._replace_producer()

    def _abort(self) -> None:
        """Abort the open transaction and rewind every partition it touched to its first record."""
        self.chains.aborted()
        if self._in_txn:
            try:
                # A short deadline: when an abort can't finish quickly, replacing the producer is faster.
                self._txn("abort", lambda: self.producer.abort_transaction(5), deadline_s=10)
            except (KafkaException, ProducerStuckError) as exc:
                log.error("abort failed (%s); replacing the producer and rewinding to the committed offsets", exc)
                self._recover()
                return
        self.stats.aborts += 1
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for (topic, partition), offset in self._first.items():
            if (topic, partition) in assigned:
                self._seek_back(topic, partition, offset, offset)
        self._reset_batch()

    def _seek_back(self, topic: str, partition: int, offset: int, known: int | None) -> None:
        """Rewind a partition to `offset`, checked by the next record fetched (`RewindCheck`): `known` is a
        record at or after `offset` the rewind goes back over (None: none is known, nothing to check)."""
        self.consumer.seek(TopicPartition(topic, partition, offset))
        if known is not None:
            self._rewinds.expect(topic, partition, offset, known)

    def _reset_batch(self) -> None:
        self._early_offsets.forget()
        self.batch = BatchCounters()
        self.sanitizer.reset_batch()
        self._in_txn = False
        self._txn_records = 0
        self._first.clear()
        self._last.clear()

    # --- transactional calls that can't hang ------------------------------------------------------
    def _txn(self, what: str, call: Callable[[], object], deadline_s: float | None = None) -> None:
        """Run a transactional producer call: retry retriable errors, and never wait past a deadline.

        After a broker restart librdkafka's transactional calls can block far beyond their own timeout
        (seen: commit_transaction(30) not returning after 150 s). The call runs in a helper thread; if
        the deadline passes, `ProducerStuckError` makes the worker replace its producer (`_recover`).
        """
        limit = deadline_s if deadline_s is not None else self._txn_deadline_s
        deadline = time.monotonic() + limit
        while True:
            future = self._txn_pool.submit(call)
            try:
                future.result(timeout=max(0.1, deadline - time.monotonic()))
                return
            except concurrent.futures.TimeoutError:
                raise ProducerStuckError(f"transactional {what} did not finish within {limit:.0f} s") from None
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.retriable() and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise

    def _recover(self) -> None:
        """Replace a failed or stuck producer and rewind to what the group really committed.

        The new producer's `init_transactions()` (same transactional id) fences the old one, and the
        coordinator aborts its open transaction. Whether the last commit went through or not, the
        group's committed offsets say where processing must resume, so nothing is lost or doubled. If
        the committed offsets can't be read, the exception reaches `run()`, which rebuilds the clients.
        """
        self.stats.aborts += 1
        self._replace_producer()
        self.chains.reset(outcome_unknown=True)
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        touched = [TopicPartition(t, p) for (t, p) in self._first if (t, p) in assigned]
        if touched:
            committed = self.consumer.committed(touched, timeout=30)
            rewound: dict[str, tuple[int, int]] = {}
            for tp in committed:
                first = self._first[(tp.topic, tp.partition)]
                last = self._last.get((tp.topic, tp.partition), first - 1)
                offset = tp.offset if tp.offset >= 0 else first
                # A record the seek goes back over: the transaction's first one there, or, if its commit
                # went through after all (committed past it), none to check.
                self._seek_back(tp.topic, tp.partition, offset, first if offset <= first else None)
                rewound[f"{tp.topic}[{tp.partition}]"] = (offset, last)
            # Where each partition resumes, and the last offset the dropped transaction had taken: the evidence
            # that nothing between the two is skipped.
            log.warning("rewound to the group's committed offsets (resume at, last taken): %s", rewound)
        self._reset_batch()

    def _replace_producer(self) -> None:
        """Purge the producer, set it aside (destroying a stuck client can block: `SetAside`), initialise a new one.

        The purge matters: an abandoned producer that kept its queued and in-flight messages would retry
        them once the broker answers again, after the new producer has fenced it and the coordinator has
        aborted its transaction. A write landing then can leave a *hanging transaction* on an output
        partition, whose last stable offset, and with it every `read_committed` reader, stops for good.
        """
        try:
            self.producer.purge(in_queue=True, in_flight=True, blocking=False)
        except (KafkaException, RuntimeError) as exc:
            log.warning("purging the abandoned producer reported %s", exc)
        self._abandoned.add(self.producer)
        self._txn_pool.shutdown(wait=False)
        self._txn_pool = DaemonExecutor("bg-txn")
        self.producer = Producer(self._producer_config)
        self._txn("init", lambda: self.producer.init_transactions(10))

    def _rebuild_clients(self) -> None:
        """Start over with a new consumer and producer, from the group's committed offsets.

        The last resort when a recovery step fails: the old consumer leaves the group (its partitions
        go back to the group with their committed offsets) and the new producer fences the old one, so
        its open transaction is aborted. Retries with a back-off until the cluster answers or a stop is
        requested.
        """
        self.stats.aborts += 1
        self._reset_batch()
        self._rewinds.forget()
        self.chains.reset(outcome_unknown=True)
        self._close_consumer(self.consumer)
        backoff = 1.0
        while self._running:
            try:
                self.consumer = Consumer(self._consumer_config)
                self._replace_producer()
                self._subscribe()
                log.warning("Kafka clients rebuilt; resuming from the committed offsets")
                return
            except (KafkaException, ProducerStuckError) as exc:
                log.error("rebuilding the Kafka clients failed (%s); retrying in %.0f s", exc, backoff)
                self._close_consumer(self.consumer)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _close_consumer(self, consumer: Consumer, deadline_s: float = 30.0) -> None:
        """Leave the group within a deadline; a consumer that can't close in time is set aside."""
        closer = DaemonExecutor("bg-close")
        future = closer.submit(consumer.close)
        try:
            future.result(timeout=deadline_s)
        except concurrent.futures.TimeoutError:
            log.warning("the consumer did not close within %.0f s; set aside", deadline_s)
            self._abandoned.add(consumer)
        except BaseException as exc:  # noqa: BLE001 - best effort; close() re-raises a rebalance callback's error
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            log.warning("closing the consumer reported %s", exc)
        finally:
            closer.shutdown(wait=False)

    # --- rebalance callbacks ----------------------------------------------------------------------
    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._in_txn:
            try:
                self._commit()
            except (KafkaException, KeyUnavailableError) as exc:
                log.warning("commit on revoke failed (%s); aborting, the new owner reprocesses", exc)
                self._abort()
        # The revoked partitions' chains continue with their next owner: reload the tails when needed.
        self.chains.reset()
        # Whoever owns them next (maybe this worker again) starts from the committed offsets.
        self._rewinds.forget((tp.topic, tp.partition) for tp in partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("%d partitions lost (session expired, e.g. a broker restart)", len(partitions))
        if self._in_txn:
            # The partitions are someone else's now: don't wait on an abort the broker may not answer
            # for a while. A new producer with the same transactional id fences ours and the coordinator
            # aborts the open transaction. Nothing to seek: the next owner of these partitions (maybe
            # this worker again) starts from the group's committed offsets.
            log.warning("replacing the producer: its open transaction covered lost partitions")
            self.stats.aborts += 1
            self._replace_producer()
            self._reset_batch()
        self._rewinds.forget((tp.topic, tp.partition) for tp in partitions)
        self.chains.reset(outcome_unknown=True)
