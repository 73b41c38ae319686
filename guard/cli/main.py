"""The `guard` command group: settings, logging, and the helpers its command modules share."""

from __future__ import annotations

import base64
import logging
import sys
from typing import Any

import click
import orjson

from guard.config import Settings, load_settings
from guard.errors import GuardError


def _settings(ctx: click.Context) -> Settings:
    obj: Settings = ctx.obj
    return obj


def _bytes_to_b64(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError


def dumps_json(record: Any) -> bytes:
    """JSON for people and pipes: bytes (ciphertexts) as base64."""
    return orjson.dumps(record, default=_bytes_to_b64)


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="GUARD_CONFIG",
              help="TOML file with a [guard] table of settings (env vars GUARD_* override it).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details (never keys or field values).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """BranchGuard: classify, encrypt, police and audit branch CDC streams."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        ctx.obj = load_settings(config_path)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
