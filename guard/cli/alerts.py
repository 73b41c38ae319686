"""`guard alerts tail | analyze | serve`: the on-call tools of the anomaly analyzers (docs/anomalies.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from guard.cli.main import _settings, dumps_json, main
from guard.kafka_security import client_config


@main.group("alerts")
def alerts() -> None:
    """Anomaly alerts: follow them, run the analyzer, serve the status page."""


@alerts.command("tail")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="Keep waiting for new alerts (--no-follow: stop once caught up).")
@click.option("-n", "--lines", default=20, show_default=True, help="Records to show from the end of each partition "
              "before following (0: only new ones).")
@click.option("--from-beginning", is_flag=True, help="Read the whole topic.")
@click.option("--severity", multiple=True, type=click.Choice(["critical", "high", "medium", "low"]),
              help="Only these severities (repeatable).")
@click.option("--branch", multiple=True, help="Only these branches (repeatable).")
@click.option("--rule", multiple=True, help="Only these rules (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of readable lines.")
@click.pass_context
def tail(ctx: click.Context, follow: bool, lines: int, from_beginning: bool, severity: tuple[str, ...],
         branch: tuple[str, ...], rule: tuple[str, ...], as_json: bool) -> None:
    """Show alerts of guard.anomalies as they come (the analyzers' alerts and the sanitizer's anomalies)."""
    from confluent_kafka import Consumer, TopicPartition

    from guard.anomaly.alerts import read_anomaly, render_line
    from guard.errors import DecodeError

    s = _settings(ctx)
    consumer = Consumer(client_config(s, **{"group.id": f"oncall-tail-{uuid.uuid4().hex[:8]}",
                                            "enable.auto.commit": False, "isolation.level": "read_committed"}))
    try:
        meta = consumer.list_topics(timeout=10).topics.get(s.anomalies_topic)
        if meta is None or meta.error is not None:
            raise click.ClickException(f"topic {s.anomalies_topic} does not exist yet (no alert so far)")
        assign, ends = [], {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(s.anomalies_topic, p), timeout=10)
            start = low if from_beginning else max(low, high - lines)
            assign.append(TopicPartition(s.anomalies_topic, p, start))
            ends[p] = high
        consumer.assign(assign)
        caught_up = {p for p, tp in zip(meta.partitions, assign, strict=True) if tp.offset >= ends[p]}
        idle_since = time.monotonic()
        while True:
            msg = consumer.poll(0.5)
            if msg is None:
                if not follow and (len(caught_up) == len(ends) or time.monotonic() - idle_since > 10):
                    return
                continue
            idle_since = time.monotonic()
            if msg.error():
                continue
            offset, partition, value = msg.offset() or 0, msg.partition() or 0, msg.value()
            if offset + 1 >= ends.get(partition, 0):
                caught_up.add(partition)
            try:
                alert = read_anomaly(value) if value else None
            except (DecodeError, ValueError):
                continue
            if alert is None or (severity and alert.get("severity") not in severity) or \
                    (branch and alert.get("branch") not in branch) or (rule and alert.get("rule") not in rule):
                continue
            click.echo(dumps_json(alert).decode() if as_json else render_line(alert))
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


@alerts.command("analyze", context_settings={"ignore_unknown_options": True})
@click.argument("faust_args", nargs=-1, type=click.UNPROCESSED)
def analyze(faust_args: tuple[str, ...]) -> None:
    """Run one analyzer worker (faust: `python -m streams.analyzer worker`); start more to scale out."""
    args = [sys.executable, "-m", "streams.analyzer", "worker", "--without-web", "-l", "info", *faust_args]
    raise SystemExit(subprocess.call(args, env=os.environ.copy()))


@alerts.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8470, show_default=True)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int) -> None:
    """Serve the on-call status page (open alerts, pipeline health and lag, transfers, recent erasures)."""
    from guard.anomaly.runtime import status_source
    from guard.anomaly.status import StatusServer

    server = StatusServer(status_source(_settings(ctx)).snapshot, host=host, port=port)
    click.echo(f"status page on http://{host}:{server.port}/ (JSON: /api/status)")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@alerts.command("publish-entities")
@click.argument("path", type=click.Path(exists=True, dir_okay=False), default="policy/entities.json")
@click.pass_context
def publish_entities(ctx: click.Context, path: str) -> None:
    """Publish the access policy's entities (Cedar JSON) to the facts topic: staff and services as the
    principal registry (owner = organisation, active/disabled), branches with a cut-off as transfers."""
    import orjson
    from confluent_kafka import Producer

    from guard.anomaly.facts import facts_from_policy_entities
    from guard.anomaly.runtime import analyzer_topics

    s = _settings(ctx)
    facts = facts_from_policy_entities(orjson.loads(Path(path).read_bytes()), int(time.time() * 1000))
    topic = analyzer_topics(s).facts
    producer = Producer(client_config(s, **{"enable.idempotence": True}))
    for f in facts:
        producer.produce(topic, f.to_json(), key=(f.principal or f.branch).encode())
    if producer.flush(30):
        raise click.ClickException(f"not every fact reached {topic}")
    kinds = {k: sum(1 for f in facts if f.kind == k) for k in ("principal", "transfer")}
    click.echo(f"{kinds['principal']} principals and {kinds['transfer']} transfers published to {topic}")
