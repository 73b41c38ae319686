"""`guard demo`: the main job end to end on the local stack, with a summary a person can read."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import click
import orjson
from confluent_kafka import Consumer, TopicPartition

from guard.config import Settings, load_settings
from guard.kafka.runner import SanitizerWorker
from guard.kafka.stats import Stats
from guard.kafka_security import client_config, default_password_file
from guard.pipeline.runtime import build_sanitizer
from guard.protect.masking import mask
from guard.records.codec import decode
from guard.workload.branch import run_workload


@dataclass
class DemoBranch:
    """One branch of the demo: its engine, database, where its tables live, and its worker's settings."""

    engine: str
    settings: Settings
    dsn: str
    namespace: str
    worker: SanitizerWorker | None = None


def run_demo(settings: Settings, *, customers: int = 20) -> None:
    from guard import stack

    click.echo("== 1/4 local stack: Kafka, Kafka Connect + Debezium, PostgreSQL (branch 0101), "
               "MariaDB (branch 0202), Redis")
    stack.up()
    env = stack.env()
    settings = load_settings(None, **{**settings.__dict__,
                                      "kafka_bootstrap": env["GUARD_KAFKA_BOOTSTRAP"],
                                      "branch_dsn": env["GUARD_BRANCH_DSN"],
                                      "redis_url": env["GUARD_REDIS_URL"],
                                      "redis_password_file": env["GUARD_REDIS_PASSWORD_FILE"],
                                      "connect_url": env["GUARD_CONNECT_URL"],
                                      "connect_credentials_file": env["GUARD_CONNECT_CREDENTIALS_FILE"],
                                      "raw_topic_prefix": env["GUARD_RAW_TOPIC_PREFIX"],
                                      **{k.removeprefix("GUARD_").lower(): v for k, v in env.items()
                                         if k.startswith("GUARD_KAFKA_")},
                                      "worker_id": "demo"})
    maria_dsn = env["GUARD_BRANCH2_DSN"]
    branches = [
        DemoBranch("PostgreSQL", settings, settings.branch_dsn, "public"),
        DemoBranch("MariaDB", settings.for_branch(env["GUARD_BRANCH2"], env["GUARD_BRANCH2_RAW_TOPIC_PREFIX"]),
                   maria_dsn, urlsplit(maria_dsn).path.lstrip("/")),  # the database, without the DSN's query
    ]
    done = threading.Event()
    threads = []
    for branch in branches:
        click.echo(f"== 2/4 starting the guard (exactly-once sanitizer) for branch {branch.settings.branch} "
                   f"({branch.engine}) on {branch.settings.raw_topic_pattern}")
        branch.worker = SanitizerWorker(branch.settings, build_sanitizer(branch.settings))
        thread = threading.Thread(target=branch.worker.run, kwargs={"until": lambda _s: done.is_set()}, daemon=True)
        thread.start()
        threads.append(thread)

    results = []
    for branch in branches:
        click.echo(f"== 3/4 branch {branch.settings.branch} workload ({branch.engine}): {customers} new customers "
                   "with accounts and transactions, contact updates, deletes")
        results.append(run_workload(branch.dsn, customers=customers, delete=2, update=5,
                                    branch_code=branch.settings.branch))
    for branch in branches:
        assert branch.worker is not None
        _wait_until_quiet(branch.worker.stats)
    done.set()
    for thread in threads:
        thread.join(60)
    for branch, result in zip(branches, results, strict=True):
        assert branch.worker is not None
        click.echo(f"\n== 4/4 summary of branch {branch.settings.branch} ({branch.engine}, "
                   f"raw topics {branch.settings.raw_topic_prefix}.{branch.namespace}.*)")
        _summary(branch.settings, branch.worker.stats, result.customers, result.deleted_customers, branch.namespace)
    click.echo("\nThe demo's guard has stopped. To keep sanitizing new changes: `make run` (or `.venv/bin/guard run`, "
               "and `guard run --branch 0202 --raw-topic-prefix br0202` for the MariaDB branch); "
               "each continues where the demo stopped.")


def _wait_until_quiet(stats: Stats, quiet_s: float = 6.0, limit_s: float = 180.0) -> None:
    """Wait until the guard has seen the workload's events and then nothing new for `quiet_s`."""
    start = time.monotonic()
    last, last_change = -1, time.monotonic()
    while time.monotonic() - start < limit_s:
        if stats.events_in != last:
            last, last_change = stats.events_in, time.monotonic()
        elif stats.events_in > 0 and time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.5)


def _summary(settings: Settings, stats: Stats, customers: list[int], deleted: list[int],
             namespace: str = "public") -> None:
    click.echo(f"events in             {stats.events_in}")
    click.echo(f"records out           {stats.records_out} (in {stats.transactions} transactions)")
    click.echo("fields protected      " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.fields_by_class.items())))
    click.echo("decisions             " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.decisions.items())))
    click.echo(f"DLQ                   {sum(stats.dlq_reasons.values())} "
               + (str(stats.dlq_reasons) if stats.dlq_reasons else ""))
    click.echo(f"erased customers      {deleted} (deleted in the branch database: crypto-shredded after the "
               f"catalog's grace period by a running worker; confirmations on {settings.deletions_topic})")
    shown = next((c for c in customers if c not in deleted), None)
    if shown is None:
        return
    raw_topic = f"{settings.raw_topic_prefix}.{namespace}.customers"
    raw = _find(settings, raw_topic, shown)
    # read back as a consumer downstream would: the `downstream` principal may read sanitized topics only
    downstream = dataclasses.replace(settings, kafka_username="downstream",
                                     kafka_password_file=str(default_password_file("downstream")))
    sanitized = _find(downstream, settings.sanitized_topic(raw_topic), shown, avro=True,
                      group="downstream-demo-reader")
    if raw is None or sanitized is None:
        click.echo("(could not find the sample record pair)")
        return
    from guard.classify.catalog import Catalog

    catalog = Catalog.load(settings.catalog or None)
    after = raw.get("after") or {}
    masked_raw = {}
    for column, value in after.items():
        policy = catalog.column(f"{namespace}.customers", column)
        if policy is None or policy.action.value != "clear":
            kind = policy.mask if policy and policy.mask else None
            masked_raw[column] = mask(kind, str(value)) if kind and value is not None else "[hidden]"
        else:
            masked_raw[column] = value
    img = sanitized.get("after") or {}
    sealed = set((img.get("sealed") or {}).get("fields", []))
    click.echo(f"\ncustomer {shown}: raw {raw_topic} (values masked here for display)  beside  its sanitized twin on "
               f"{settings.sanitized_topic(raw_topic)}")
    click.echo(f"{'column':<13} {'raw (masked for display)':<34} sanitized")
    for column, shown_raw in masked_raw.items():
        if column in img.get("clear", {}):
            twin = f"clear: {img['clear'][column]}"
        elif column in sealed:
            parts = ["sealed (AES-256-GCM)"]
            if column in img.get("masked", {}):
                parts.append(f"masked {img['masked'][column]}")
            if column in img.get("index", {}):
                parts.append(f"index {img['index'][column][:10]}…")
            twin = ", ".join(parts)
        elif column in img.get("hashed", {}):
            twin = "keyed hash"
        elif column in img.get("dropped", []):
            twin = "dropped (C3)"
        else:
            twin = "?"
        click.echo(f"{column:<13} {str(shown_raw)[:34]:<34} {twin}")
    ct = (img.get("sealed") or {}).get("ct", b"")
    click.echo(f"subject token {sanitized.get('subject')} (branch {sanitized.get('branch')}); one {len(ct)}-byte "
               f"ciphertext seals {len(sealed)} fields; key = this customer's data key (crypto-shreddable)")


def _find(settings: Settings, topic: str, customer_id: int, *, avro: bool = False,
          group: str = "guard-demo-reader") -> dict[str, Any] | None:
    """The newest record of `topic` whose key names `customer_id` (reads the topic's recent tail)."""
    consumer = Consumer(client_config(settings, **{"group.id": group, "enable.auto.commit": False,
                                                   "isolation.level": "read_committed"}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            return None
        assignment = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            assignment.append(TopicPartition(topic, p, max(low, high - 2000)))
        consumer.assign(assignment)
        found = None
        idle = 0
        while idle < 3:
            msgs = consumer.consume(500, 1.0)
            if not msgs:
                idle += 1
                continue
            for msg in msgs:
                key, value = msg.key(), msg.value()
                if msg.error() or value is None or key is None:
                    continue
                try:
                    if orjson.loads(key).get("customer_id") != customer_id:
                        continue
                except orjson.JSONDecodeError:
                    continue
                record = decode(value) if avro else orjson.loads(value)
                if record.get("op") != "d":
                    found = record
        return found
    finally:
        consumer.close()
