"""Memory and key state at scale (`--memory-scale`): a branch's initial snapshot of N customers, N in steps.

For each population size a fresh raw topic is filled with one snapshot read (`op: r`) of every customer
(1..N, the demo `customers` row as the connector sends it), streamed to Kafka as it is generated so the
bench itself never holds N events. One guard worker (a fresh branch: every key is new) drains it; the
bench records the worker's peak RSS (sampled every 0.5 s), its key counters, and the key store's
`used_memory` (Redis `INFO memory`) before the drain and after the worker stopped, so the key store's
bytes per customer are what N customers' keys (data key, activity, retention entries) cost in Redis.
The run's keys and topics are deleted after each size.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka.admin import AdminClient

from guard.bench.common import BenchError, log
from guard.bench.drain import drain_fresh
from guard.bench.topics import Names, _fill_producer, _produce, cleanup_kafka, cleanup_redis, create_topic
from guard.bench.workers import BenchContext, RssSampler, WorkerSet
from guard.bench.workload import _envelope, customer_rows
from guard.config import Settings
from guard.kafka_security import client_config


def snapshot_events(customers: int, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of one snapshot read per customer 1..`customers`, generated as they are consumed."""
    now_ms = int(time.time() * 1000)
    for cid in range(1, customers + 1):
        row = customer_rows(cid, seed, now_ms)[0]
        prefix = _envelope("r", None, row, 26_735_008 + cid * 96, now_ms)
        yield orjson.dumps({"customer_id": cid}), prefix + b"%d}" % now_ms


def fill_stream(client: dict[str, Any], topic: str, events: Iterator[tuple[bytes, bytes]]) -> int:
    """Produce `events` to `topic` as they are generated; returns how many. `client`: `client_config`'s."""
    producer = _fill_producer(client, 20)
    count = 0
    for key, value in events:
        _produce(producer, topic, key, value)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    if producer.flush(300) != 0:
        raise BenchError(f"could not write the snapshot to {topic}")
    return count


def redis_used_memory(settings: Settings) -> int:
    """Redis's `used_memory`, asked as the guard's (authenticated, TLS) Redis user."""
    from guard.keys.redis_client import redis_client

    return int(redis_client(settings.redis_url, settings.redis_password_file).info("memory")["used_memory"])


def measure_scale(settings: Settings, sizes: list[int], *, partitions: int = 2,
                  key_cache_ttl: float | None = None) -> list[dict[str, Any]]:
    """One first-sight snapshot drain per size in `sizes`; what the worker and the key store hold."""
    admin = AdminClient(client_config(settings))
    rows: list[dict[str, Any]] = []
    for size in sizes:
        names = Names(uuid.uuid4().hex[:8])
        sampler = RssSampler(0.5)
        ctx = BenchContext(settings, names, partitions, sampler, Path(tempfile.mkdtemp(prefix=f"{names.prefix}-")),
                           tables=["public.customers"], key_cache_ttl=key_cache_ttl)
        try:
            create_topic(admin, names.input(), partitions)
            create_topic(admin, names.sanitized(), partitions)
            started = time.monotonic()
            filled = fill_stream(client_config(settings), names.input(), snapshot_events(size))
            log.info("memory scale: %d snapshot events of %d customers written in %.0fs", filled, size,
                     time.monotonic() - started)
            before = redis_used_memory(settings)
            workers = WorkerSet(ctx, "guard", 1, names.group("scale"), "guard").start()
            try:
                result = drain_fresh(ctx, workers)
                idle_rss = [rss for _, label, _, rss in sampler.samples if label == "guard"][-1:]
            finally:
                result_workers = workers.stop()
            after = redis_used_memory(settings)
            row = {"customers": size, "events": result.events, "events_per_s": round(result.events_per_s, 1),
                   "seconds": round(result.seconds, 1), "peak_rss_mib": round(sampler.peak_mib("guard"), 1),
                   "rss_at_end_mib": round(idle_rss[0] / 2**20, 1) if idle_rss else None,
                   "redis_used_memory_before": before, "redis_used_memory_after": after,
                   "redis_bytes_per_customer": round((after - before) / size, 1),
                   "keys": result.keys, "dlq": result_workers[0].get("dlq_reasons") if result_workers else None}
            rows.append(row)
            log.info("memory scale: %d customers: %.0f events/s, peak RSS %.1f MiB, key store %+.1f MiB "
                     "(%.0f B per customer)", size, result.events_per_s, row["peak_rss_mib"],
                     (after - before) / 2**20, row["redis_bytes_per_customer"])
        finally:
            sampler.close()
            cleanup_kafka(admin, names, ctx.groups)
            cleanup_redis(settings.redis_url, names, [])
    return rows



def main(argv: list[str] | None = None) -> int:
    """`python -m guard.bench.scale 100000,300000,1000000 [--json-out F]`: only the memory-scale phase."""
    import argparse
    import logging
    import sys

    import orjson

    from guard.bench.report import machine_facts
    from guard.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m guard.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("sizes", help="comma-separated customer counts, e.g. 100000,300000,1000000")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    rows = measure_scale(load_settings(None), sizes, partitions=args.partitions)
    report = {"memory_scale": rows, "machine": machine_facts()}
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
