"""`guard demo`."""

from __future__ import annotations

import click

from guard.cli.main import _settings, main
from guard.errors import GuardError


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
