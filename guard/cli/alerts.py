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


@alerts.command("rehearse")
@click.option("--seed", type=int, default=None, help="The day's seed (default: a random one, printed).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds the analyzer may take to count the day.")
@click.option("--keep", is_flag=True, help="Keep the rehearsal's topics and Redis keys (to look at them).")
@click.pass_context
def rehearse(ctx: click.Context, seed: int | None, timeout: float, keep: bool) -> None:
    """Play a compressed day of synthetic branch traffic with planted abuses through the live stack and check
    that each abuse raised exactly one alert of its rule and the normal traffic none (docs/anomalies.md).

    The day's facts go to a topic of their own (`<app id>-r<hex>.facts`), an analyzer worker (a process, as
    the configured Kafka principal, normally `analyzer`) counts them in a Redis tenant of their own (named
    like the topics: the Redis user must be allowed it, e.g. the stack's admin), and its alerts are read back
    from `<app id>-r<hex>.anomalies`. Exit status 1 when the check fails.
    """
    import random
    import tempfile

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from guard.anomaly.alerts import read_anomaly
    from guard.anomaly.rehearsal import check, plan_day
    from guard.errors import DecodeError
    from guard.keys.redis_client import redis_client

    s = _settings(ctx)
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000_000)
    began = time.monotonic()
    day = plan_day(seed, branch=s.branch)
    name = f"{os.environ.get('GUARD_ANALYZER_APP_ID', 'branchguard-analyzer')}-r{uuid.uuid4().hex[:8]}"
    facts_topic, alerts_topic = f"{name}.facts", f"{name}.anomalies"
    click.echo(f"seed {seed}: {len(day.facts)} facts ({day.normal_facts} of normal traffic on the day), "
               f"{len(day.planted)} planted abuses; topics {name}.*")
    admin = AdminClient(client_config(s))
    for fut in admin.create_topics([NewTopic(facts_topic, 1, 1), NewTopic(alerts_topic, 1, 1)]).values():
        fut.result(30)
    work = Path(tempfile.mkdtemp(prefix="rehearsal-"))
    log_path = work / "analyzer.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        producer = Producer(client_config(s, **{"enable.idempotence": True, "linger.ms": 20}))
        for f in day.facts:  # keyed by the branch: one partition, the day in order
            producer.produce(facts_topic, f.to_json(), key=f.branch.encode())
        if producer.flush(60):
            raise click.ClickException(f"not every fact reached {facts_topic}")
        env = {**os.environ, "GUARD_TENANT": name, "GUARD_FACTS_TOPIC": facts_topic,
               "GUARD_ANOMALIES_TOPIC": alerts_topic, "GUARD_AUDIT_TOPIC": f"{name}.audit",
               "GUARD_DLQ_TOPIC": f"{name}.dlq", "GUARD_DELETIONS_TOPIC": f"{name}.deletions",
               "GUARD_CONTACT_TOPICS": "", "GUARD_ANALYZER_APP_ID": name, "GUARD_ANALYZER_DATADIR": str(work / "data"),
               "GUARD_ANALYZER_FLUSH_S": "2"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "streams.analyzer", "worker", "--without-web", "-l", "info"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        consumer = Consumer(client_config(s, **{"group.id": name, "enable.auto.commit": False}))
        try:
            end = consumer.get_watermark_offsets(TopicPartition(facts_topic, 0), timeout=10)[1]
            deadline = time.monotonic() + timeout
            while True:
                [done] = consumer.committed([TopicPartition(facts_topic, 0)], timeout=10)
                if done.offset >= end:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise click.ClickException(f"the analyzer did not count the day (committed {done.offset} of "
                                               f"{end}):\n{tail}")
                time.sleep(1.0)
        finally:
            consumer.close()
        counted = time.monotonic() - started
        alerts = []
        reader = Consumer(client_config(s, **{"group.id": name, "enable.auto.commit": False,
                                              "isolation.level": "read_committed"}))
        try:
            high = reader.get_watermark_offsets(TopicPartition(alerts_topic, 0), timeout=10)[1]
            reader.assign([TopicPartition(alerts_topic, 0, 0)])
            position, idle = 0, time.monotonic()
            while position < high and time.monotonic() - idle < 30:
                msg = reader.poll(0.5)
                if msg is None or msg.error():
                    continue
                position, idle = (msg.offset() or 0) + 1, time.monotonic()
                try:
                    alerts.append(read_anomaly(msg.value() or b""))
                except (DecodeError, ValueError):
                    continue
        finally:
            reader.close()
        report = check(alerts, day.planted)
        for line in report.lines():
            click.echo(line)
        click.echo(f"{'PASS' if report.ok else 'FAIL'} seed {seed}: {sum(len(i) for i in report.found.values())} "
                   f"alert(s) for {len(day.planted)} planted abuses, {len(report.unexpected)} unexpected; the "
                   f"analyzer counted the day in {counted:.1f} s, the rehearsal took {time.monotonic() - began:.1f} s")
        if not report.ok:
            raise SystemExit(1)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not keep:  # the day's topics, faust's own topics of the worker, the tenant's keys
            mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name)]
            if mine:
                admin.delete_topics(mine)
            client = redis_client(s.redis_url, s.redis_password_file or None)
            for key in client.scan_iter(match=f"bg:{name}:*", count=500):
                client.delete(key)
