"""`guard stack ...`: the local stack (Kafka, Connect + Debezium, PostgreSQL, Redis)."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from guard.cli.main import main


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
    """Print `export` lines for the stack's addresses and where its credentials are (never their values)."""
    from guard import stack as s

    for key, value in _run_stack(s.env).items():
        click.echo(f"export {key}={shlex.quote(value)}")  # DSNs and URLs carry '&': quoted for eval


@stack.command("rotate")
@click.argument("what", type=click.Choice(["redis", "postgres"]))
def stack_rotate(what: str) -> None:
    """New passwords for Redis (guard, admin) or PostgreSQL (branch_app, cdc), applied to the running stack."""
    from guard.stack.orchestrator import rotate

    _run_stack(lambda: rotate(what))


def _run_stack(fn: Any) -> Any:
    from guard.stack import StackError

    try:
        return fn()
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
