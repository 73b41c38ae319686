"""`guard connector render|apply`: the Debezium connector config rendered from the classification catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from guard.cli.main import main

if TYPE_CHECKING:
    from guard.classify.catalog import Catalog


@main.group("connector")
def connector() -> None:
    """The branch database's Debezium connector, rendered from the catalog (C3 columns never leave it in clear)."""


def _catalog(path: str | None) -> Catalog:
    from guard.classify.catalog import Catalog
    from guard.errors import GuardError

    try:
        return Catalog.load(path)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


_ENGINE = click.option("--engine", type=click.Choice(["postgres", "mariadb"]), default="postgres", show_default=True,
                       help="Which branch: postgres (0101, connectors/branch-postgres.json) or mariadb (0202, "
                            "connectors/branch-mariadb.json).")


@connector.command("render")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False), default=None,
              help="Catalog to render from (default: GUARD_CATALOG, else schemas/catalog.toml).")
@click.option("--template", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Connector template (default: the engine's, connectors/branch-<engine>.json).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the document here instead of standard output.")
@_ENGINE
def render(catalog_path: str | None, template: str | None, output: str | None, engine: str) -> None:
    """Print the connector document: the template plus the catalog's C3 column options.

    Secrets stay placeholders (${CDC_PASSWORD}, ${CONNECTOR_HASH_SALT}); `guard connector apply` and
    `guard stack up` fill them in when they register it. What happens to each C3 column goes to stderr.
    """
    from guard.classify.source import source_rules
    from guard.stack.config import StackConfig
    from guard.stack.connector import config_file, connectors_dir, namespace, render_connector
    from guard.stack.errors import StackError

    catalog = _catalog(catalog_path)
    ns = namespace(StackConfig.from_env(), engine)
    try:
        doc = render_connector(catalog, Path(template) if template else connectors_dir() / config_file(engine), ns)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    text = json.dumps(doc, indent=2) + "\n"
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)
    for rule in source_rules(catalog, ns):
        click.echo(f"{rule.table}.{rule.column}: {rule.why}", err=True)


@connector.command("apply")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False), default=None,
              help="Catalog to render from (default: GUARD_CATALOG, else schemas/catalog.toml).")
@_ENGINE
def apply(catalog_path: str | None, engine: str) -> None:
    """Render and register the connector on the stack's Connect (PUT only when the config changed).

    Records already in the raw topics keep what they had; they age out with the raw topics' retention.
    """
    from guard.stack.connector import ensure_connector
    from guard.stack.errors import StackError

    try:
        outcome = ensure_connector(catalog=_catalog(catalog_path), engine=engine)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"connector {outcome}")
