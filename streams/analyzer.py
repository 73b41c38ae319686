"""The anomaly analyzer on faust-streaming: `python -m streams.analyzer worker -l info` (or `guard alerts analyze`).

One agent, concurrency 1, at-least-once (faust's exactly-once is experimental, and with concurrency > 1 it
can commit past a message still in flight: faust-streaming issue #606). It reads the guard's evidence
topics, `guard.facts` and the sanitized customers topic, turns each record into facts
(guard/anomaly/facts.py), runs the rules (guard/anomaly/engine.py, state in Redis, idempotent per fact) and
writes alerts to `guard.anomalies`, keyed by the alert id. An alert is marked written only after Kafka
acknowledged it, and the source offset is committed only after the agent finished the record, so a crash
anywhere re-sends the same alert id, never a second alert. Critical alerts also go to the webhook of the
branch's `[delivery] webhook_url` (guard/anomaly/delivery.py): queued in Redis before the alert counts as
written, retried by the timer with back-off until the webhook accepted them.

Scale: more workers with the same app id share the source partitions (faust's consumer group); all
counters are in Redis, so they agree whatever partition a fact arrives on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import faust
import redis
from aiokafka.errors import KafkaError

from guard.anomaly.delivery import Pager
from guard.anomaly.engine import Emit
from guard.anomaly.facts import Fact, facts_from_record
from guard.anomaly.runtime import analyzer_topics, build_analyzer
from guard.config import load_settings
from guard.errors import DecodeError, KeyUnavailableError
from guard.kafka_security import client_config, sasl_credentials

log = logging.getLogger("branchguard.analyzer")

settings = load_settings()
topics = analyzer_topics(settings)
analyzer = build_analyzer(settings)
pager = Pager(analyzer.state, analyzer.rules)
APP_ID = os.environ.get("GUARD_ANALYZER_APP_ID", "branchguard-analyzer")
FLUSH_S = float(os.environ.get("GUARD_ANALYZER_FLUSH_S", "30"))
BATCH = int(os.environ.get("GUARD_ANALYZER_BATCH", "2000"))
#: A worker that dies without leaving the group (SIGKILL, a lost machine) keeps its facts partitions until
#: its session expires: faust's default of 60 s held alerts back for a minute. 20 s, with faust's 3-s
#: heartbeats, as the guard's workers (15 s) do.
SESSION_TIMEOUT_S = float(os.environ.get("GUARD_ANALYZER_SESSION_TIMEOUT_S", "20"))

_mechanism, _username, _password, _tls = sasl_credentials(settings)  # SASL_SSL only: never plaintext
app = faust.App(
    APP_ID,
    broker="kafka://" + settings.kafka_bootstrap,
    # the principal of GUARD_KAFKA_USERNAME (on the local stack: `analyzer`, guard/stack/kafka_auth.py)
    broker_credentials=faust.SASLCredentials(username=_username, password=_password, mechanism=_mechanism,
                                             ssl_context=_tls),
    store="memory://",  # no faust tables: the shared state is in Redis (guard/anomaly/state.py says why)
    processing_guarantee="at_least_once",
    web_enabled=False,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    datadir=os.environ.get("GUARD_ANALYZER_DATADIR", os.path.join(os.environ.get("GUARD_STACK_HOME", "."), APP_ID)),
    producer_acks=-1,
    broker_session_timeout=SESSION_TIMEOUT_S,
)

def _existing(names: list[str]) -> list[str]:
    """The source topics that exist: subscribing to a missing one would make a broker with
    auto.create.topics.enable create it with one partition (a sanitized topic must get its raw topic's)."""
    from confluent_kafka.admin import AdminClient

    from guard.kafka.clients import OUTPUT_TOPIC_PARTITIONS, TopicManager

    admin = AdminClient(client_config(settings))
    manager = TopicManager(admin)
    for own in (topics.facts, topics.anomalies):  # the facts topic and the alerts' topic: created if missing
        manager.ensure(own, OUTPUT_TOPIC_PARTITIONS)
    present = admin.list_topics(timeout=30).topics
    missing = [n for n in names if n not in present]
    if missing:
        print(f"MISSING {' '.join(missing)} (not read; restart the analyzer once they exist)", flush=True)
    return [n for n in names if n in present]


sources = app.topic(*_existing(topics.sources()), key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw")
alerts_out = app.topic(topics.anomalies, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
_stats: dict[str, float] = {"facts": 0, "records": 0, "alerts": 0, "undecodable": 0, "since": 0.0, "last": 0.0}


async def _write(emits: list[Emit]) -> None:
    """Write alerts to Kafka, each recorded as written only after the broker's acknowledgement; critical ones
    are queued for the webhook and tried once here (`Pager`: retried by the timer until delivered)."""
    page_now: list[str] = []
    for emit in emits:
        fut = await alerts_out.send(key=emit.id.encode(), value=emit.value)
        await fut  # the broker's acknowledgement (acks=all), before the state says "written"
        # queued for the webhook before the version counts as written: a crash in between re-queues it on replay
        paged = pager.queue(emit.record)
        analyzer.emitted(emit)
        _stats["alerts"] += 1
        print(f"ALERT {emit.record['rule']} {emit.id} v{emit.version} {emit.record['state']} count={emit.count}",
              flush=True)
        if paged:
            page_now.append(emit.id)
    if page_now:  # the first attempt at once; a failure leaves the page queued for the timer's retries
        await asyncio.to_thread(pager.deliver_due, page_now)


@app.agent(sources, concurrency=1)
async def analyze(stream: faust.StreamT) -> None:
    """Batches of up to BATCH records (or what arrived within 0.2 s); faust acks a batch's offsets only after
    this body finished it (`take_events`), so a crash replays the whole batch: counts are idempotent."""
    roles = topics.roles()
    async for events in stream.take_events(BATCH, within=0.2):
        if not _stats["since"]:
            _stats["since"] = time.monotonic()
        facts = []
        for event in events:
            msg = event.message
            _stats["records"] += 1
            try:
                facts += facts_from_record(msg.topic, msg.partition, msg.offset, int(msg.timestamp * 1000),
                                           event.value, topics=roles)
            except (DecodeError, ValueError, KeyError, TypeError) as exc:
                _stats["undecodable"] += 1
                log.warning("skipped %s:%s:%s: %s", msg.topic, msg.partition, msg.offset, type(exc).__name__)
        _stats["facts"] += len(facts)
        if facts:
            await _settle(facts)
        _stats["last"] = time.monotonic()


async def _settle(facts: list[Fact]) -> None:
    """Process a batch until it is done. Never raise out of the agent: faust's `take_events` acks the batch
    in a `finally`, so an exception would commit offsets of facts never counted. Redis or Kafka being away
    pauses the stream (retried with back-off); anything else ends the process without acking, and the
    restarted worker replays the batch (counts are idempotent)."""
    delay = 0.5
    while True:
        try:
            await _write(analyzer.process_batch(facts))
            return
        except (redis.RedisError, KeyUnavailableError, KafkaError) as exc:
            log.error("paused: %s (retrying in %.1f s)", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception as exc:  # noqa: BLE001 - see the docstring: die unacked rather than ack unprocessed
            log.critical("analyzer stopped on %s; the batch will be replayed", type(exc).__name__)
            sys.stdout.flush()
            os._exit(70)


@app.on_partitions_assigned.connect
async def on_assigned(sender: faust.App, assigned: set[object], **kwargs: object) -> None:
    """Log which source partitions this worker owns (operators and tests read it)."""
    mine = sorted(f"{tp.topic}:{tp.partition}" for tp in assigned  # type: ignore[attr-defined]
                  if tp.topic in topics.sources())  # type: ignore[attr-defined]
    print(f"ASSIGNED {' '.join(mine) or '-'}", flush=True)


@app.timer(interval=FLUSH_S)
async def flush() -> None:
    """Write held-back updates, resolve alerts whose window ended, retry critical alerts the webhook has not
    accepted yet (a page is never given up: `Pager`); log the throughput."""
    try:
        await _write(analyzer.flush())
    except (redis.RedisError, KafkaError) as exc:  # the next tick tries again
        log.error("flush skipped: %s", type(exc).__name__)
    try:
        await asyncio.to_thread(pager.deliver_due)
    except redis.RedisError as exc:  # the pages stay queued; the next tick tries again
        log.error("page retries skipped: %s", type(exc).__name__)
    busy = max(_stats["last"] - _stats["since"], 1e-9)  # first record read → last record finished
    print(f"STATS facts={_stats['facts']:.0f} records={_stats['records']:.0f} alerts={_stats['alerts']:.0f} "
          f"undecodable={_stats['undecodable']:.0f} busy_s={busy:.2f} records_per_s={_stats['records'] / busy:.0f} "
          f"facts_per_s={_stats['facts'] / busy:.0f}", flush=True)


if __name__ == "__main__":
    app.main()
