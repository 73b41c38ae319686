"""`guard classify`: which columns hold what, for a table or a raw topic."""

from __future__ import annotations

import click

from guard.cli.main import _settings, dumps_json, main
from guard.errors import GuardError


@main.command("classify")
@click.option("--table", help="schema.table in the branch database (GUARD_BRANCH_DSN).")
@click.option("--topic", help="A raw CDC topic to sample instead.")
@click.option("--sample", default=200, show_default=True, help="Rows or records to inspect.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def classify(ctx: click.Context, table: str | None, topic: str | None, sample: int, as_json: bool) -> None:
    """Report what each column of a table (or topic sample) is classified as, and why."""
    from guard.classify.report import classify_table, classify_topic

    if bool(table) == bool(topic):
        raise click.UsageError("give exactly one of --table or --topic")
    settings = _settings(ctx)
    try:
        rows = classify_table(settings, table, sample) if table else classify_topic(settings, str(topic), sample)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(dumps_json(rows).decode())
        return
    for row in rows:
        click.echo(f"{row['column']:<24} {row['class']:<5} {row['action']:<8} {row['category']:<15} {row['why']}")
