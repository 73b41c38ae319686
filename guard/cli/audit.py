"""`guard audit keygen | verify | prove`: the signing key, checking the audit chains, inclusion proofs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from guard.cli.main import _settings, main
from guard.errors import GuardError

if TYPE_CHECKING:
    from guard.audit.verify import Kept, Observed


@main.group("audit")
def audit() -> None:
    """The audit trail's Merkle chains: verify them, prove a record (docs/audit.md)."""


@audit.command("keygen")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key file (default: the audit_signing_key setting's path); `.pub` is written beside it.")
@click.pass_context
def keygen(ctx: click.Context, out: Path | None) -> None:
    """Create an Ed25519 signing key (0600) and its verifier key; an existing key is never replaced."""
    from guard.audit.note import generate_key_files, public_path
    from guard.audit.writer import signing_key_path

    path = out or signing_key_path(_settings(ctx))
    if path.exists():
        raise click.ClickException(f"{path} exists; remove it first to make a new key")
    generate_key_files(path)
    click.echo(str(public_path(path)))


def _default_key(ctx: click.Context, key: Path | None) -> Path:
    from guard.audit.note import public_path
    from guard.audit.writer import signing_key_path

    return key or public_path(signing_key_path(_settings(ctx)))


def _read(ctx: click.Context, audit_topic: str | None, deletions_topic: str | None, store_topic: str | None,
          since_ms: int) -> tuple[list[Observed], list[Kept]]:
    from guard.kafka.audit_chain import read_topic, second_store
    from guard.keys.store import RedisKeyStore

    s = _settings(ctx)
    audit_topic = audit_topic or s.audit_topic
    leaves, kept = read_topic(s, audit_topic, since_ms=since_ms)
    deletions = s.deletions_topic if deletions_topic is None else deletions_topic
    if deletions:
        more, kept_more = read_topic(s, deletions, since_ms=since_ms, confirmations=True)
        leaves += more
        kept += kept_more
    # The guard's Redis user: the checkpoints are under its tenant's prefix, which its ACL allows.
    store = RedisKeyStore(s.redis_url, s.tenant, password_file=s.redis_password_file or None)
    kept += second_store(store.audit_checkpoints(store_topic or audit_topic))
    return leaves, kept


_TOPIC_OPTIONS = [
    click.option("--audit-topic", default=None, help="The audit topic to read (default: the setting; a copy works)."),
    click.option("--deletions-topic", default=None,
                 help="The deletions topic to read (default: the setting; '' to verify the audit topic alone)."),
    click.option("--store-topic", default=None,
                 help="The audit topic whose checkpoints the second store holds (default: --audit-topic; "
                      "name the original when verifying a copy)."),
    click.option("--since-ms", type=int, default=0, help="Read records from this time on (unix ms)."),
    click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="The verifier key (name+id+base64; default: the signing key's .pub)."),
]


def _topic_options(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_TOPIC_OPTIONS):
        fn = option(fn)
    return fn


@audit.command("verify")
@_topic_options
@click.option("--strict", is_flag=True, help="Records after a chain's last checkpoint are a break too.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, audit_topic: str | None, deletions_topic: str | None, store_topic: str | None,
               since_ms: int, key: Path | None, strict: bool, as_json: bool) -> None:
    """Recompute every chain, check every checkpoint (topic and second store); exit 1 on any break."""
    from guard.audit.note import load_verifier
    from guard.audit.verify import checkpointed_with_records, verify

    try:
        verifier = load_verifier(_default_key(ctx, key))
        leaves, kept = _read(ctx, audit_topic, deletions_topic, store_topic, since_ms)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    # Chains are chosen by the topic their records were found in, never by their names: a chain's name is
    # the writer's (or a forger's) claim, and a record of a deletions chain in the audit topic is a finding.
    s = _settings(ctx)
    topics = {"audit": audit_topic or s.audit_topic}
    deletions = s.deletions_topic if deletions_topic is None else deletions_topic
    if deletions:
        topics["deletions"] = deletions
    report = verify(leaves, kept, verifier, strict=strict, topics=topics)
    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(f"{report.records} records, {len(report.chains)} chains, {report.checkpoints} checkpoints "
                   f"(topic and second store), {sum(c.unanchored for c in report.chains)} records after their "
                   "chain's last checkpoint")
        for brk in report.breaks:
            click.echo(brk.line())
        # (one-shot and side chains: a break)
        loose = [c for c in report.chains if c.unanchored and not checkpointed_with_records(c.chain)]
        for c in loose[:10]:
            click.echo(f"unanchored: chain {c.chain}: {c.unanchored} records after its last checkpoint "
                       f"(size {c.checkpointed}); a break with --strict")
        if len(loose) > 10:
            click.echo(f"unanchored: {len(loose) - 10} more chains")
        click.echo("OK: every chain verifies" if report.ok else f"BROKEN: {len(report.breaks)} break(s)")
    sys.exit(0 if report.ok else 1)


@audit.command("prove")
@_topic_options
@click.option("--chain", default=None, help="The chain id (with --seq).")
@click.option("--seq", type=int, default=None, help="The record's sequence number in its chain.")
@click.option("--at", "at", default=None, help="Or the record's place: TOPIC:PARTITION:OFFSET.")
@click.pass_context
def prove_cmd(ctx: click.Context, audit_topic: str | None, deletions_topic: str | None, store_topic: str | None,
              since_ms: int, key: Path | None, chain: str | None, seq: int | None, at: str | None) -> None:
    """Print an RFC 6962 inclusion proof of one record against its chain's latest checkpoint (JSON)."""
    from guard.audit.chain import parse_prefix
    from guard.audit.note import load_verifier
    from guard.audit.verify import prove

    try:
        verifier = load_verifier(_default_key(ctx, key))
        leaves, kept = _read(ctx, audit_topic, deletions_topic, store_topic, since_ms)
        if at is not None:
            topic, partition, offset = at.rsplit(":", 2)
            rec = next((r for r in leaves if (r.topic, r.partition, r.offset) == (topic, int(partition), int(offset))),
                       None)
            if rec is None or rec.header is None:
                raise GuardError(f"no chained record at {at}")
            prefix = parse_prefix(rec.header)
            chain, seq = prefix.chain, prefix.seq
        if chain is None or seq is None:
            raise GuardError("name the record: --chain and --seq, or --at TOPIC:PARTITION:OFFSET")
        click.echo(orjson.dumps(prove(leaves, kept, verifier, chain, seq), option=orjson.OPT_INDENT_2).decode())
    except (GuardError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


# ---- reading the trail -------------------------------------------------------------------------------------
def audit_line(where: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One audit record as people read it: who did what to which records, the decision and its policies.

    The decision's details are the JSON in `reason` (write decisions, reveals, searches; docs/policy.md and
    docs/reveal.md); other records (per-event protection, erasures) keep their `reason` as text. A change's
    own record that carries its write decision (audit format 2) reads as that decision, the change's own
    decision (e.g. `protected`) under `change`.
    """
    from guard.records.codec import write_decision_of

    reason = doc.get("reason")
    detail: dict[str, Any] = {}
    write = write_decision_of(doc)
    if write is not None:
        detail = write[1]
    elif isinstance(reason, str) and reason.startswith("{"):
        try:
            parsed = orjson.loads(reason)
            detail = parsed if isinstance(parsed, dict) else {}
        except orjson.JSONDecodeError:
            detail = {}
    line = {"at": where, "ts_ms": doc.get("ts_ms"), "op": doc.get("op"),
            "decision": doc.get("decision") if write is None else write[0],
            "branch": doc.get("branch"), "table": doc.get("table"), "principal": detail.get("principal"),
            "action": detail.get("action"), "policies": detail.get("policies"),
            "source": f"{doc.get('source_topic')}[{doc.get('source_partition')}]@{doc.get('source_offset')}",
            "subject": doc.get("subject"), "request": doc.get("trace_id"), "worker": doc.get("worker")}
    for name in ("purpose", "asked", "given", "refused", "why", "reason", "decisions", "errors", "client"):
        if name in detail:
            line[name] = detail[name]
    if not detail and reason is not None:
        line["reason"] = reason
    if write is not None and doc.get("decision") != write[0]:
        line["change"] = doc.get("decision")
    return line


def line_matches(line: dict[str, Any], decisions: tuple[str, ...], ops: tuple[str, ...], principal: str | None,
             request: str | None) -> bool:
    if decisions and not any(line["decision"] == d or (d.endswith("*") and str(line["decision"]).startswith(d[:-1]))
                             for d in decisions):
        return False
    if ops and line["op"] not in ops:
        return False
    if principal is not None and _principal_key(line.get("principal")) != _principal_key(principal):
        return False
    return request is None or line.get("request") == request


def _principal_key(text: Any) -> str | None:
    """`Staff::"x"`, `Staff::x` and `Staff:x` (the attribution contract's form) name the same principal."""
    if not isinstance(text, str):
        return None
    kind, _, ident = text.replace('"', "").partition(":")
    return f"{kind}:{ident.lstrip(':')}" if ident else f"Staff:{kind}"


@audit.command("show")
@click.option("--audit-topic", default=None, help="The audit topic to read (default: the setting; a copy works).")
@click.option("--since-ms", type=int, default=0, help="Read records from this time on (unix ms).")
@click.option("--decision", "decisions", multiple=True,
              help="Only these decisions (repeatable; a trailing * matches a prefix: 'write_*', 'reveal_*').")
@click.option("--op", "ops", multiple=True, help="Only these ops (repeatable: c, u, d, reveal, search, checkpoint...).")
@click.option("--principal", default=None, help="Only this principal (Staff:x, Staff::x or Staff::\"x\").")
@click.option("--request", default=None, help="Only the records of this reveal or search call (its X-Request-Id).")
@click.option("--checkpoints", is_flag=True, help="Show checkpoint records too (hidden by default).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def show_cmd(ctx: click.Context, audit_topic: str | None, since_ms: int, decisions: tuple[str, ...],
             ops: tuple[str, ...], principal: str | None, request: str | None, checkpoints: bool,
             as_json: bool) -> None:
    """Print the audit records (decoded; never a value): one line per decision, with principal and policies.

    Reads every committed record to the topic's current end, as `verify` does (run it as `oncall`).
    """
    from guard.kafka.audit_chain import read_topic
    from guard.records.codec import decode

    s = _settings(ctx)
    topic = audit_topic or s.audit_topic
    try:
        leaves, kept = read_topic(s, topic, since_ms=since_ms)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    shown = 0
    for obs in leaves:
        try:
            doc = decode(obs.value or b"")
        except Exception:  # noqa: BLE001 - not an audit record: say where, never its bytes
            doc = {"decision": "undecodable"}
        line = audit_line(obs.where, doc)
        if not line_matches(line, decisions, ops, principal, request):
            continue
        shown += 1
        click.echo(orjson.dumps(line).decode() if as_json else human_line(line))
    if checkpoints and not decisions and principal is None and request is None:
        for k in kept:
            lines = k.note.split("\n")
            origin, size = (lines[0], lines[1]) if len(lines) > 2 else ("(undecodable)", "?")
            click.echo(orjson.dumps({"at": k.where, "op": "checkpoint", "note": k.note}).decode() if as_json
                       else f"{k.where} checkpoint {origin} size {size}")
    click.echo(f"{shown} of {len(leaves)} records shown", err=True)


def human_line(line: dict[str, Any]) -> str:
    import time

    ts = line.get("ts_ms")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000)) if isinstance(ts, int) else "-"
    parts = [when, str(line["at"]), str(line["op"]), str(line["decision"])]
    if line.get("principal") is not None or line.get("action"):
        parts.append(f"principal={line.get('principal')}")
    if line.get("policies") is not None:
        parts.append("policies=" + (",".join(line["policies"]) or "none"))
    parts.append(f"table={line.get('table')}")
    parts.append(f"source={line['source']}")
    for name in ("purpose", "asked", "given", "refused", "why", "reason", "decisions", "errors", "client"):
        if line.get(name) not in (None, [], {}, ""):
            value = line[name]
            parts.append(f"{name}={value if isinstance(value, str) else orjson.dumps(value).decode()}")
    if line.get("request"):
        parts.append(f"request={line['request']}")
    return " ".join(parts)


@audit.command("copy")
@click.option("--from", "source", default=None, help="The topic to copy (default: the audit_topic setting).")
@click.option("--to", "target", required=True, help="A new topic: created with the source's partition count.")
@click.pass_context
def copy_cmd(ctx: click.Context, source: str | None, target: str) -> None:
    """Copy a chained topic record by record (key, value, headers, timestamp, partition) for `verify`.

    Every committed record to the source's current end goes to the same partition of the new topic, so
    `guard audit verify --audit-topic COPY --deletions-topic '' --store-topic ORIGINAL` checks the copy
    against the original's checkpoints in the second store. Needs a principal that may read the source
    and create and write the target (the local stack's `admin`).
    """
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from guard.kafka.audit_chain import verify_group
    from guard.kafka.reading import READER_SETTINGS, read_to_end
    from guard.kafka_security import client_config

    s = _settings(ctx)
    source = source or s.audit_topic
    consumer = Consumer(client_config(s, **{"group.id": verify_group(s), **READER_SETTINGS}))
    try:
        meta = consumer.list_topics(source, timeout=10).topics.get(source)
        if meta is None or meta.error is not None:
            raise click.ClickException(f"topic {source} does not exist or {s.kafka_username} may not describe it")
        admin = AdminClient(client_config(s))
        try:
            admin.create_topics([NewTopic(target, len(meta.partitions))])[target].result(30)
        except KafkaException as exc:
            raise click.ClickException(f"topic {target} could not be created ({exc.args[0].str()}): name a new "
                                       "topic, as a principal that may create it") from None
        producer = Producer(client_config(s, **{"enable.idempotence": True, "acks": "all"}))
        n = 0
        for msg in read_to_end(consumer, source):
            partition: int = msg.partition()  # type: ignore[assignment]
            producer.produce(target, msg.value(), msg.key(), partition=partition, headers=msg.headers(),
                             timestamp=msg.timestamp()[1])
            n += 1
            if n % 10_000 == 0:
                producer.poll(0)
        left = producer.flush(60)
        if left:
            raise click.ClickException(f"{left} records of the copy were not acknowledged: the copy is incomplete")
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        consumer.close()
    click.echo(f"copied {n} records of {source} to {target} ({len(meta.partitions)} partitions)")
