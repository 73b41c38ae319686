"""`guard run` (the worker) and `guard sanitize` (the same transform, offline)."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import click
import orjson

from guard.cli.main import _settings, dumps_json, main
from guard.config import load_settings
from guard.errors import GuardError


@main.command("run")
@click.option("--worker-id", help="Stable id of this worker (names its transactional id). Default: hostname.")
@click.option("--max-idle", type=float, default=None, help="Exit after this many idle seconds (tests, batch).")
@click.option("--branch", "branch", default=None, metavar="CODE",
              help="Serve this other branch (e.g. 0202, the stack's MariaDB branch) with --raw-topic-prefix; its "
                   "consumer group is <group id>-<CODE>.")
@click.option("--raw-topic-prefix", "raw_prefix", default=None, metavar="PREFIX",
              help="With --branch: the branch's raw topic prefix (e.g. br0202).")
@click.pass_context
def run(ctx: click.Context, worker_id: str | None, max_idle: float | None, branch: str | None,
        raw_prefix: str | None) -> None:
    """Sanitize the branch's raw CDC topics into sanitized.* topics, exactly once, until SIGTERM.

    One worker serves one branch; run one per branch (`guard run` and `guard run --branch 0202
    --raw-topic-prefix br0202` on the local stack)."""
    from confluent_kafka import KafkaException

    from guard.kafka.runner import ProducerStuckError, SanitizerWorker
    from guard.pipeline.runtime import build_sanitizer

    settings = _settings(ctx)
    if worker_id:
        settings = load_settings(None, **{**settings.__dict__, "worker_id": worker_id})
    if (branch is None) != (raw_prefix is None):
        raise click.UsageError("--branch and --raw-topic-prefix go together")
    if branch is not None and raw_prefix is not None:
        settings = settings.for_branch(branch, raw_prefix)
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
            f"Kafka at {settings.kafka_bootstrap} failed the sanitizer ({exc}); check `guard stack status`, "
            "GUARD_KAFKA_BOOTSTRAP and the credentials (GUARD_KAFKA_USERNAME, _PASSWORD_FILE, _CA_FILE; "
            "`guard doctor` checks them). Restart the worker with the same --worker-id: it resumes from the last "
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
