"""The `guard` command line."""

from __future__ import annotations

import base64
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import click
import orjson

from guard.config import Settings, load_settings
from guard.errors import GuardError


def _settings(ctx: click.Context) -> Settings:
    obj: Settings = ctx.obj
    return obj


def _bytes_to_b64(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError


def dumps_json(record: Any) -> bytes:
    """JSON for people and pipes: bytes (ciphertexts) as base64."""
    return orjson.dumps(record, default=_bytes_to_b64)


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="GUARD_CONFIG",
              help="TOML file with a [guard] table of settings (env vars GUARD_* override it).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details (never keys or field values).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """BranchGuard: classify, encrypt, police and audit branch CDC streams."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        ctx.obj = load_settings(config_path)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


# --- the local stack ------------------------------------------------------------------------------
@main.group()
def stack() -> None:
    """Run the local stack (Kafka, Connect + Debezium, PostgreSQL, Redis) without Docker."""


@stack.command("up")
def stack_up() -> None:
    """Install (once) and start every service, and wait until each answers. Safe to run twice."""
    from guard import stack as s

    _run_stack(s.up)


@stack.command("down")
def stack_down() -> None:
    """Stop what `up` started; data is kept."""
    from guard import stack as s

    _run_stack(s.down)


@stack.command("status")
def stack_status() -> None:
    """Say what runs."""
    from guard import stack as s

    statuses = _run_stack(s.status)
    for st in statuses:
        click.echo(f"{st.name:<10} {'running' if st.running else 'stopped':<8} {st.detail}")
    if not all(st.running for st in statuses):
        sys.exit(3)


@stack.command("env")
def stack_env() -> None:
    """Print `export` lines for the stack's addresses (eval "$(guard stack env)")."""
    from guard import stack as s

    for key, value in _run_stack(s.env).items():
        click.echo(f"export {key}={value}")


def _run_stack(fn: Any) -> Any:
    from guard.stack import StackError

    try:
        return fn()
    except StackError as exc:
        raise click.ClickException(str(exc)) from None


# --- the sanitizer --------------------------------------------------------------------------------
@main.command("run")
@click.option("--worker-id", help="Stable id of this worker (names its transactional id). Default: hostname.")
@click.option("--max-idle", type=float, default=None, help="Exit after this many idle seconds (tests, batch).")
@click.pass_context
def run(ctx: click.Context, worker_id: str | None, max_idle: float | None) -> None:
    """Sanitize the branch's raw CDC topics into sanitized.* topics, exactly once, until SIGTERM."""
    from confluent_kafka import KafkaException

    from guard.kafka.runner import ProducerStuckError, SanitizerWorker
    from guard.pipeline.runtime import build_sanitizer

    settings = _settings(ctx)
    if worker_id:
        settings = load_settings(None, **{**settings.__dict__, "worker_id": worker_id})
    try:
        worker = SanitizerWorker(settings, build_sanitizer(settings))
        worker.install_signal_handlers()
        logging.getLogger("guard").info(
            "sanitizer %s consuming %s (group %s)", settings.worker_id, settings.raw_topic_pattern, settings.group_id
        )
        stats = worker.run(max_idle_s=max_idle)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    except (KafkaException, ProducerStuckError) as exc:
        raise click.ClickException(
            f"Kafka at {settings.kafka_bootstrap} failed the sanitizer ({exc}); check `guard stack status` or "
            "GUARD_KAFKA_BOOTSTRAP. Restart the worker with the same --worker-id: it resumes from the last "
            "committed transaction."
        ) from None
    click.echo(dumps_json(stats.__dict__).decode(), err=True)


@main.command("sanitize")
@click.argument("input_file", type=click.File("rb"), default="-")
@click.option("--dlq", "dlq_file", type=click.File("w"), default=None,
              help="Write failed lines here (JSON lines) instead of stderr.")
@click.pass_context
def sanitize(ctx: click.Context, input_file: Any, dlq_file: TextIO | None) -> None:
    """Sanitize Debezium change-event JSON values offline, one per line, in order.

    Prints one sanitized JSON object per input line (`null` for a tombstone). A line that can't be
    processed goes to stderr (or --dlq) with its line number and reason; the exit code is then 1.
    Offline runs never shred keys: a delete of a customer row is sanitized but triggers no erasure.
    """
    from guard.cdc.envelope import decode_value
    from guard.errors import DecodeError
    from guard.pipeline.runtime import build_sanitizer
    from guard.records.codec import decode

    settings = _settings(ctx)
    try:
        sanitizer = build_sanitizer(settings, shared_alerts=False)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    sanitizer.act_on_deletes = False
    failed = 0
    out = sys.stdout.buffer
    for number, line in enumerate(input_file, start=1):
        line = line.strip()
        if not line:
            continue
        reason, detail = None, None
        try:
            event = decode_value(line)
        except DecodeError as exc:
            reason, detail = exc.reason, exc.detail
        if reason is None and event is None:
            out.write(b"null\n")
            continue
        if reason is None and event is not None:
            topic = f"{settings.raw_topic_prefix}.{event.schema_table}"
            outcome = sanitizer.process(topic, 0, number, None, line)
            if outcome.decision == "dlq":
                dlq = orjson.loads(next(r.value or b"{}" for r in outcome.records if r.topic == settings.dlq_topic))
                reason, detail = dlq["reason"], dlq["detail"]
            else:
                value = next(r.value or b"" for r in outcome.records if r.topic == settings.sanitized_topic(topic))
                out.write(dumps_json(decode(value)) + b"\n")
                continue
        failed += 1
        problem = {"line": number, "reason": reason, "detail": detail}
        if dlq_file is not None:
            dlq_file.write(dumps_json(problem).decode() + "\n")
        else:
            click.echo(f"line {number}: {reason}: {detail}", err=True)
    out.flush()
    if failed:
        click.echo(f"{failed} line(s) could not be sanitized", err=True)
        sys.exit(1)


@main.command("demo")
@click.option("--customers", default=20, show_default=True, help="New customers the workload inserts.")
@click.pass_context
def demo(ctx: click.Context, customers: int) -> None:
    """Start the stack if needed, run the guard over a short branch workload, and print a summary."""
    from guard.demo.run import run_demo

    try:
        run_demo(_settings(ctx), customers=customers)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


# --- classification, erasure, keys -----------------------------------------------------------------
@main.command("classify")
@click.option("--table", help="schema.table in the branch database (GUARD_BRANCH_DSN).")
@click.option("--topic", help="A raw CDC topic to sample instead.")
@click.option("--sample", default=200, show_default=True, help="Rows or records to inspect.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def classify(ctx: click.Context, table: str | None, topic: str | None, sample: int, as_json: bool) -> None:
    """Report what each column of a table (or topic sample) is classified as, and why."""
    from guard.classify.report import classify_table, classify_topic

    if bool(table) == bool(topic):
        raise click.UsageError("give exactly one of --table or --topic")
    settings = _settings(ctx)
    try:
        rows = classify_table(settings, table, sample) if table else classify_topic(settings, str(topic), sample)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(dumps_json(rows).decode())
        return
    for row in rows:
        click.echo(f"{row['column']:<24} {row['class']:<5} {row['action']:<8} {row['category']:<15} {row['why']}")


@main.command("erase")
@click.option("--subject", required=True, help="The data subject's id in the branch database (customer_id).")
@click.option("--reason", required=True, type=click.Choice([
    "art47_1_purpose_achieved", "art47_2_retention_expired", "art47_3_consent_withdrawn",
    "art47_4_unlawful_processing", "art47_5_other_legal", "subject_request"]),
    help="PIPL Art. 47 trigger.")
@click.option("--by", "operator", required=True, help="Who orders the erasure (recorded in the confirmation).")
@click.pass_context
def erase(ctx: click.Context, subject: str, reason: str, operator: str) -> None:
    """Crypto-shred a data subject's keys and write the confirmation to guard.deletions."""
    from guard.erasure.service import erase_subject

    try:
        confirmation = erase_subject(_settings(ctx), subject, reason, operator)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(dumps_json(confirmation).decode())


@main.command("retention")
@click.option("--now", type=float, default=None, help="Pretend it is this unix time (drills, tests).")
@click.option("--by", "operator", default="retention-sweep", show_default=True)
@click.pass_context
def retention(ctx: click.Context, now: float | None, operator: str) -> None:
    """Erase every data subject whose retention period ran out; prints one confirmation per line."""
    from guard.erasure.service import sweep_retention

    try:
        for confirmation in sweep_retention(_settings(ctx), now=now, by=operator):
            click.echo(dumps_json(confirmation).decode())
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("hold")
@click.option("--subject", required=True, help="The data subject's id (customer_id).")
@click.option("--release", is_flag=True, help="Lift the hold instead.")
@click.pass_context
def hold(ctx: click.Context, subject: str, release: bool) -> None:
    """Put a data subject under legal hold: erasure then keeps it storage-only (PIPL Art. 47 para. 2)."""
    from guard.pipeline.runtime import build_keys

    settings = _settings(ctx)
    try:
        keys = build_keys(settings, listen=False)
        keys.store.set_hold(settings.branch, keys.subject_token(subject), not release)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"subject {keys.subject_token(subject)} {'released' if release else 'held'}")


@main.command("keys-init")
def keys_init() -> None:
    """Create the local master key file (mode 0600) if there is none."""
    from guard.keys.kms import DEFAULT_KEY_FILE, LocalKeyring

    LocalKeyring.from_environment(create=True)
    click.echo(f"master key ready ({DEFAULT_KEY_FILE} unless GUARD_MASTER_KEY[_FILE] is set)")


@main.command("bench")
@click.option("--records", default=200_000, show_default=True)
@click.option("--partitions", default=2, show_default=True)
@click.option("--workers", default=1, show_default=True)
@click.option("--trials", default=3, show_default=True,
              help="Throughput trials per mode, alternating plain and guard; each mode's median counts.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--latency-seconds", type=float, default=None,
              help="Measured seconds of each latency phase, after 5 s of paced warm-up (default 20 s).")
@click.option("--warmup-seconds", type=float, default=None,
              help="Untimed plain and guard drains before the trials (default 45 s; none below 50k records; "
                   "0 for none).")
@click.option("--scaling", is_flag=True, help="Also run the guard with 1 then 2 workers on 2 partitions.")
@click.option("--soak", type=float, default=0.0, metavar="SECONDS",
              help="Also run a steady 50%-rate soak and report RSS drift (the memory target needs 600).")
@click.option("--keep", is_flag=True, help="Keep the bench topics, groups and keys.")
@click.pass_context
def bench(ctx: click.Context, records: int, partitions: int, workers: int, trials: int, json_out: Path | None,
          latency_seconds: float | None, warmup_seconds: float | None, scaling: bool, soak: float,
          keep: bool) -> None:
    """Plain consume-produce vs the guard on the same records; last line `ratio <guard/plain>`."""
    from guard.bench.run import run_bench

    try:
        run_bench(_settings(ctx), records=records, partitions=partitions, workers=workers, json_out=json_out,
                  latency_seconds=latency_seconds, scaling=scaling, soak_seconds=soak, keep=keep, trials=trials,
                  warmup_seconds=warmup_seconds)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
