"""`guard doctor`: checks a deployment, one line per check with what to do; exit 1 on any failure."""

from __future__ import annotations

import click

from guard.cli.main import _settings, main


@main.command("doctor")
@click.option("--settle", type=float, default=None, metavar="SECONDS",
              help="How long an unstable output partition may stand still before it counts as a hanging "
                   "transaction. Default: the transaction timeout plus 30 s.")
@click.pass_context
def doctor(ctx: click.Context, settle: float | None) -> None:
    """Check the deployment: one line per check, what to do on failure; exit 1 on any failure."""
    from guard.doctor import run_checks

    failed = 0
    for check in run_checks(_settings(ctx), settle_s=settle):
        click.echo(check.line())
        failed += not check.ok
    if failed:
        raise SystemExit(1)
