"""`guard bench`: the guard's sanitizer against a plain exactly-once loop, on the same records, in one run.

Why it is built this way:

- **Same records, same plumbing.** The raw-looking topics `bench<runid>.public.<table>` are filled once
  with Debezium JSON change events (`guard.bench.workload`: by default a realistic branch day over every
  table of the demo schema, Zipf-skewed over a million customers; `--workload hot` the earlier
  customers-only, 4,000-customer workload), shaped as the live connector writes them. Both modes read
  them with the same consumer settings, batch policy and exactly-once protocol (see `guard.bench.worker`);
  only the transform differs. The plain loop (the lean loop: one pass, positional `produce`) copies values
  unchanged; the guard runs the real `SanitizerWorker`.
- **Processes, not threads.** Every worker is its own OS process, so W workers really run in parallel and
  each one's RSS is sampled on its own (psutil, from this parent).
- **Throughput window.** From the first record a worker hands to its transform to the commit that made the
  group's committed offsets cover every input record (workers report both; the parent confirms completion
  from the group's committed offsets). Process start-up and the group join are excluded for both modes.
- **Trials.** The throughput of each mode is measured `--trials` times (default 3), alternating plain and
  guard, each trial a fresh consumer group over the whole input. A guard trial is two drains: first sight
  (a branch of its own, so every customer's data key is created) and steady state (a new worker on that
  branch: every key exists in the key store, none is cached). Each mode's figure is its median trial; the
  ratio is the steady state's median over the plain loop's, `ratio_first_sight` the first sight's. On a
  shared machine one short plain window (about 2 s for 200k records) moved by half between runs;
  alternating trials spread a slow spell over both modes.
- **Latency.** With the workers caught up, a paced producer writes at half the guard's measured maximum rate
  and a read_committed consumer on the output topic computes `now - ts_ms` of the change event's envelope.
  The envelope time is stamped at send time, so this is true end to end (producer, broker, fetch, transform,
  transaction commit, LSO, downstream fetch) and doesn't depend on the runner carrying record timestamps.
- **Noise.** The machine is shared with the broker, Connect and PostgreSQL; numbers are only comparable
  within one run, which is why the ratio, not the absolute rate, is the headline (the last line printed).

Run `python -m guard.bench --help` for every option; `guard bench` exposes records, partitions, workers and
the JSON file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from guard.bench.common import BENCH_KEY_CACHE_TTL_S, LATENCY_WARMUP_S, SOAK_TARGET_S, WARMUP_S
from guard.bench.profile import profile_local, render_profile
from guard.bench.report import emit_report
from guard.bench.trials import BenchOptions, run
from guard.bench.workload import HOT_CUSTOMERS, REALISTIC_CUSTOMERS, WORKLOADS
from guard.config import Settings, load_settings
from guard.errors import GuardError


def run_bench(settings: Settings, *, records: int = 200_000, partitions: int = 2, workers: int = 1,
              json_out: Path | None = None, latency_seconds: float | None = None, scaling: bool = False,
              soak_seconds: float = 0.0, keep: bool = False, trials: int = 3,
              warmup_seconds: float | None = None, workload: str = "realistic", customers: int | None = None,
              key_cache_ttl: float | None = None, memory_scale: list[int] | None = None,
              db_latency_seconds: float = 0.0, db_rate: float | None = None,
              latency_trace: Path | None = None, latency_rate: float | None = None) -> dict[str, Any]:
    """Entry point of `guard bench` (and `python -m guard.bench`): run, print, write JSON, return it."""
    opts = BenchOptions(records=records, partitions=partitions, workers=workers, latency_seconds=latency_seconds,
                        warmup_seconds=warmup_seconds, scaling=scaling, soak_seconds=soak_seconds, keep=keep,
                        json_out=json_out, trials=trials, workload=workload, customers=customers,
                        key_cache_ttl=key_cache_ttl, memory_scale=memory_scale or [],
                        db_latency_seconds=db_latency_seconds, db_rate=db_rate, latency_trace=latency_trace,
                        latency_rate=latency_rate)
    report = run(settings, opts)
    emit_report(report, json_out)
    return report


def _sizes(text: str) -> list[int]:
    """`100000,300000,1000000` -> [100000, 300000, 1000000] (each positive)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of customer counts: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("customer counts must be positive")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guard.bench", description="Plain EOS loop vs the guard.")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3,
                        help="throughput trials per mode, alternating plain and guard; the median counts")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help=f"measured seconds of each latency phase, after {LATENCY_WARMUP_S:.0f} s of paced "
                             "warm-up (default 20 s; 5 s after 1 s below 50k records)")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help=f"untimed plain and guard drains before the trials (default {WARMUP_S:.0f} s; "
                             "none below 50k records; 0 for none)")
    parser.add_argument("--scaling", action="store_true", help="also run the guard with 1 then 2 workers")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help=f"also run a steady 50%%-rate soak for RSS drift (the target needs {SOAK_TARGET_S})")
    parser.add_argument("--keep", action="store_true", help="keep the bench topics, groups and keys")
    parser.add_argument("--workload", choices=WORKLOADS, default="realistic",
                        help="realistic: a branch day over every demo table (default); hot: customers only, "
                             "4,000 customers, nearly every key cached")
    parser.add_argument("--customers", type=int, default=None,
                        help=f"customer population (default {REALISTIC_CUSTOMERS:,} realistic, {HOT_CUSTOMERS:,} hot)")
    parser.add_argument("--key-cache-ttl", type=float, default=None,
                        help=f"guard workers' data-key cache TTL in s (default {BENCH_KEY_CACHE_TTL_S:.0f} "
                             "realistic, the guard's default for hot)")
    parser.add_argument("--memory-scale", type=_sizes, default=[], metavar="N,N,...",
                        help="also measure peak RSS and key-store memory per customer after a first-sight "
                             "snapshot of N customers, for each N (e.g. 100000,300000,1000000)")
    parser.add_argument("--db-latency", type=float, default=0.0, metavar="SECONDS",
                        help="also measure commit-to-raw and commit-to-sanitized latency on the local stack's "
                             "branch database for SECONDS (after 10 s of warm-up)")
    parser.add_argument("--db-rate", type=float, default=None,
                        help="rows/s written in --db-latency (default: half the guard's measured max rate)")
    parser.add_argument("--latency-trace", type=Path, default=None, metavar="FILE",
                        help="trace the guard workers' activity (batches, key loads, cache clears, commits, GC) "
                             "and write each latency phase's (send ms, latency ms) pairs, the spans and where "
                             "the slowest 1%% waited to FILE (JSON); the report summarises it")
    parser.add_argument("--latency-rate", type=float, default=None, metavar="EVENTS_PER_S",
                        help="events/s of the latency phases and the soak (default: half the guard's measured "
                             "rate); to compare two builds at the same load")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--profile-local", type=int, default=0, metavar="RECORDS",
                        help="instead: profile the sanitizer over RECORDS bench events in a loop, no Kafka")
    parser.add_argument("--cprofile-out", type=Path, default=None, help="with --profile-local: cProfile dump")
    parser.add_argument("--cleanup", action="store_true",
                        help="instead: delete the topics and keys that runs killed with SIGKILL left on this "
                             "stack (raw topics hold plaintext); only while no bench is running")
    args = parser.parse_args(argv)
    # A bench stopped with SIGTERM (`kill`, `pkill`, a CI timeout) cleans up as one stopped with Ctrl-C does:
    # Python's default for SIGTERM skips every `finally`, which left the run's topics (raw plaintext
    # included) and its hundreds of thousands of keys in Redis, and a later append-only-file rewrite of those
    # keys took minutes (docs/benchmark.md, round 18).
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.cleanup:
            print(render_cleanup(clean_leftovers(load_settings(None))))
            return 0
        if args.profile_local:
            result = profile_local(load_settings(None), args.profile_local, cprofile_out=args.cprofile_out)
            print(render_profile(result))
            if args.json_out is not None:
                args.json_out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        run_bench(load_settings(None), records=args.records, partitions=args.partitions, workers=args.workers,
                  json_out=args.json_out, latency_seconds=args.latency_seconds, scaling=args.scaling,
                  soak_seconds=args.soak, keep=args.keep, trials=args.trials, warmup_seconds=args.warmup_seconds,
                  workload=args.workload, customers=args.customers, key_cache_ttl=args.key_cache_ttl,
                  memory_scale=args.memory_scale, db_latency_seconds=args.db_latency, db_rate=args.db_rate,
                  latency_trace=args.latency_trace, latency_rate=args.latency_rate)
    except GuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def clean_leftovers(settings: Settings) -> dict[str, int]:
    """`--cleanup`: every bench run's topics and keys on this stack (`topics.cleanup_leftovers`)."""
    from confluent_kafka.admin import AdminClient

    from guard.bench.topics import cleanup_leftovers
    from guard.kafka_security import client_config

    return cleanup_leftovers(AdminClient(client_config(settings)), settings.redis_url)


def render_cleanup(removed: dict[str, int]) -> str:
    return (f"removed what bench runs left: {removed['topics']} topic(s) of {removed['runs']} run(s), "
            f"{removed['keys']} key(s)")


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    """Raise SystemExit in the main thread: the run's `finally` blocks stop its workers and delete its topics
    and keys (unless `--keep`)."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
