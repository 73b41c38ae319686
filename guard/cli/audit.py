"""`guard audit keygen | verify | prove`: the signing key, checking the audit chains, inclusion proofs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson

from guard.cli.main import _settings, main
from guard.errors import GuardError

if TYPE_CHECKING:
    from guard.audit.note import Verifier
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
    from guard.audit.verify import one_shot, verify

    try:
        verifier = load_verifier(_default_key(ctx, key))
        leaves, kept = _read(ctx, audit_topic, deletions_topic, store_topic, since_ms)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    chains = None
    if deletions_topic == "":
        found = _chain_names(leaves) | _kept_chains(kept, verifier)
        chains = {name for name in found if name.startswith("audit/")}
    report = verify(leaves, kept, verifier, strict=strict, chains_filter=chains)
    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(f"{report.records} records, {len(report.chains)} chains, {report.checkpoints} checkpoints "
                   f"(topic and second store), {sum(c.unanchored for c in report.chains)} records after their "
                   "chain's last checkpoint")
        for brk in report.breaks:
            click.echo(brk.line())
        loose = [c for c in report.chains if c.unanchored and not one_shot(c.chain)]  # (one-shot: a break)
        for c in loose[:10]:
            click.echo(f"unanchored: chain {c.chain}: {c.unanchored} records after its last checkpoint "
                       f"(size {c.checkpointed}); a break with --strict")
        if len(loose) > 10:
            click.echo(f"unanchored: {len(loose) - 10} more chains")
        click.echo("OK: every chain verifies" if report.ok else f"BROKEN: {len(report.breaks)} break(s)")
    sys.exit(0 if report.ok else 1)


def _chain_names(leaves: list[Observed]) -> set[str]:
    from guard.audit.verify import chain_leaves

    return set(chain_leaves(leaves)[0])


def _kept_chains(kept: list[Kept], verifier: Verifier) -> set[str]:
    from guard.audit.verify import Break, checkpoints_by_chain

    breaks: list[Break] = []
    return set(checkpoints_by_chain(kept, verifier, breaks))


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

