"""`guard erase`, `guard retention`, `guard hold`: erasure on request, retention, legal holds."""

from __future__ import annotations

import click

from guard.classify.catalog import ERASURE_REASONS
from guard.cli.main import _settings, dumps_json, main
from guard.errors import GuardError


@main.command("erase")
@click.option("--subject", required=True, help="The data subject's id in the branch database (customer_id).")
@click.option("--reason", required=True, type=click.Choice(list(ERASURE_REASONS)), help="PIPL Art. 47 trigger.")
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
@click.option("--release", is_flag=True, help="Lift the hold instead (an erasure it deferred is carried out).")
@click.option("--by", "operator", default="legal-hold", show_default=True,
              help="Who sets or lifts the hold (recorded in a deferred erasure's confirmation).")
@click.pass_context
def hold(ctx: click.Context, subject: str, release: bool, operator: str) -> None:
    """Put a data subject under legal hold: erasure then keeps it storage-only (PIPL Art. 47 para. 2).

    Storage-only: the subject's changes keep flowing sealed, nothing of it can be revealed, and an
    erasure is deferred until the hold is released, which then carries it out.
    """
    from guard.erasure.service import release_hold
    from guard.pipeline.runtime import build_keys

    settings = _settings(ctx)
    try:
        if release:
            confirmation = release_hold(settings, subject, operator)
            keys = build_keys(settings, listen=False)
            click.echo(f"subject {keys.subject_token(settings.branch, subject)} released")
            if confirmation is not None:
                click.echo(dumps_json(confirmation).decode())
            return
        keys = build_keys(settings, listen=False)
        keys.store.set_hold(settings.branch, keys.subject_token(settings.branch, subject), True)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"subject {keys.subject_token(settings.branch, subject)} held")
