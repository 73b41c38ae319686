"""`guard reveal`: the reveal service (`serve`) and its tokens (`token create`, `token list`, `token revoke`)."""

from __future__ import annotations

from typing import Any

import click

from guard.cli.main import _settings, main


@main.group("reveal")
def reveal() -> None:
    """The reveal service: the only path from a sanitized record to plaintext (docs/reveal.md)."""


@reveal.command("serve")
@click.option("--host", default=None, help="Address to listen on (default: reveal_host, 127.0.0.1); without "
              "reveal_tls_cert/key only a loopback address is accepted.")
@click.option("--port", type=int, default=None, help="Port (default: reveal_port, 8443).")
@click.option("--policy", "policy_dir", type=click.Path(file_okay=False), default=None,
              help="Policy directory (default: policy_dir, `policy/` of the checkout).")
@click.option("--staff", type=click.Choice(["db", "file"]), help="Staff entities from the branch database or "
              "entities.json only (default: the policy_staff setting).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, policy_dir: str | None, staff: str | None) -> None:
    """Serve the reveal API (HTTPS with reveal_tls_cert/key, else HTTP on loopback) until Ctrl-C or SIGTERM."""
    import dataclasses

    from guard.cli.policy_engine import load_engine, staff_unreadable
    from guard.errors import GuardError
    from guard.reveal.server import serve as run

    settings = _settings(ctx)
    settings = dataclasses.replace(settings, reveal_host=host or settings.reveal_host,
                                   reveal_port=port or settings.reveal_port)
    loaded = load_engine(settings, policy_dir, staff, bucket_s=settings.policy_bucket_s)
    if loaded.source_error is not None:
        # It serves anyway (that staff is denied until a refresh reads them, every 30 s): say so.
        click.echo(f"warning: {staff_unreadable(loaded)}; their calls are denied until a refresh reads them",
                   err=True)
    try:
        run(settings, loaded.engine)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


@reveal.group("token")
def token() -> None:
    """Bearer tokens of the reveal service (stored only as keyed hashes)."""


@token.command("create")
@click.option("--principal", required=True, help="Who the token is for: Staff::<id> or Service::<id> of the policy.")
@click.option("--ttl-days", type=int, default=None, help="Expire after this many days (default: never).")
@click.option("--policy", "policy_dir", type=click.Path(file_okay=False), default=None,
              help="Policy directory the principal must be an entity of (default: policy_dir, `policy/`).")
@click.option("--staff", type=click.Choice(["db", "file"]), help="Staff entities from the branch database or "
              "entities.json only (default: the policy_staff setting).")
@click.option("--allow-unknown-principal", is_flag=True,
              help="Create the token although the policy doesn't know the principal yet (every call it makes "
                   "is denied until it does).")
@click.pass_context
def token_create(ctx: click.Context, principal: str, ttl_days: int | None, policy_dir: str | None,
                 staff: str | None, allow_unknown_principal: bool) -> None:
    """Create a token and print it once: only its keyed hash is stored.

    The principal must be an entity of the running policy (entities.json or the branch's staff tables):
    a token for a misspelt or departed principal would only ever be denied, and would look like a
    policy fault when it is used.
    """
    from guard.errors import GuardError
    from guard.reveal.server import token_store
    from guard.reveal.tokens import PRINCIPAL_RE

    settings = _settings(ctx)
    try:
        if PRINCIPAL_RE.match(principal):
            _check_principal(settings, principal, policy_dir, staff, allow_unknown_principal)
        tok, info = token_store(settings, create_key=True).create(
            principal, ttl_s=None if ttl_days is None else ttl_days * 86_400)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"token id {info.id} for {info.principal} (shown once; keep it secret):", err=True)
    click.echo(tok)


def _check_principal(settings: Any, principal: str, policy_dir: str | None, staff: str | None,
                     allow_unknown: bool) -> None:
    """Refuse (or, with `allow_unknown`, warn about) a principal the policy's entities, as the reveal service
    would load them, don't define; say so when the branch database's staff could not be read instead."""
    from guard.cli.policy_engine import load_engine, staff_unreadable
    from guard.policy.engine import parse_uid

    loaded = load_engine(settings, policy_dir, staff)
    if loaded.engine.knows(parse_uid(principal)):
        return
    if loaded.source_error is not None:
        message = f"{principal} could not be checked: {staff_unreadable(loaded)}"
    else:
        message = (f"{principal} is not an entity of the policy (entities.json, or the branch database's "
                   "staff tables with --staff db): check the spelling, or add the principal first")
    if not allow_unknown:
        raise click.ClickException(message + "; --allow-unknown-principal creates the token anyway")
    click.echo(f"warning: {message}; every call with this token is denied until the policy knows it", err=True)


@token.command("list")
@click.pass_context
def token_list(ctx: click.Context) -> None:
    """Token ids, principals and dates (never a token or a hash).

    An entry whose MAC doesn't verify (written before entries had one, or altered in Redis) is listed as
    not authenticated: it is refused on every call, and is revoked and re-created, not repaired.
    """
    import time

    from guard.reveal.server import token_store

    stale = 0
    for info in token_store(_settings(ctx)).list():
        expires = "never" if info.expires_ms is None else time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.expires_ms / 1000))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_ms / 1000))
        flag = "" if info.authentic else "  NOT AUTHENTICATED (refused)"
        stale += not info.authentic
        click.echo(f"{info.id}  {info.principal}  created {created}  expires {expires}{flag}")
    if stale:
        click.echo(f"warning: {stale} token(s) without a valid MAC are refused on every call: create new ones with "
                   "`guard reveal token create --principal ...`, then `guard reveal token revoke --id ...` the old",
                   err=True)


@token.command("revoke")
@click.option("--id", "token_id", default=None, help="The token id (from `create` or `list`).")
@click.option("--principal", default=None, help="Every token of this principal.")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str | None, principal: str | None) -> None:
    """Delete tokens: the next call with them is refused."""
    from guard.errors import GuardError
    from guard.reveal.server import token_store

    try:
        n = token_store(_settings(ctx)).revoke(token_id=token_id, principal=principal)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {n} token(s)")
