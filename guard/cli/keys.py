"""`guard keys-init`: the local master key."""

from __future__ import annotations

import click

from guard.cli.main import main


@main.command("keys-init")
def keys_init() -> None:
    """Create the local master key file (mode 0600) if there is none."""
    from guard.keys.kms import DEFAULT_KEY_FILE, LocalKeyring

    LocalKeyring.from_environment(create=True)
    click.echo(f"master key ready ({DEFAULT_KEY_FILE} unless GUARD_MASTER_KEY[_FILE] is set)")
