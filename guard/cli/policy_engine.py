"""The access-policy engine as the CLI's commands load it: `guard policy check`, `guard reveal serve` and
`guard reveal token create` read the same directory and the same staff source, the way a running service
would, so what one command accepts the others do too.

Why a helper: the engine never raises when its staff source (the branch database) can't be read; it logs
the failure and treats that staff as unknown, so a service keeps denying them until a refresh reads them
(fail closed). A command that answers a person needs more than a log line: it must be able to say "the
branch database could not be read" instead of "this principal is not in the policy". `LoadedEngine`
carries the source's failure, if any, next to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from guard.config import Settings
    from guard.policy.engine import PolicyEngine


@dataclass(frozen=True)
class LoadedEngine:
    """A policy engine and why its staff source could not be read at load (None: it was, or there is none)."""

    engine: PolicyEngine
    staff_from_db: bool
    source_error: str | None


def policy_directory(settings: Settings, given: str | None) -> Path:
    """`--policy`, else the `policy_dir` setting, else the checkout's `policy/`."""
    from guard.policy.engine import default_directory

    return Path(given or settings.policy_dir or default_directory())


def load_engine(settings: Settings, policy_dir: str | None, staff: str | None, **engine_options: Any) -> LoadedEngine:
    """The engine of `policy_dir` (see `policy_directory`) with staff from the branch database when
    `staff` (else the `policy_staff` setting) is `db`. `engine_options` go to `PolicyEngine`.

    Raises click's exception, saying what to do, when the directory is missing or its policy invalid.
    """
    from guard.errors import GuardError
    from guard.policy import PolicyEngine
    from guard.policy.sources import database_source

    from_db = (staff or settings.policy_staff) == "db"
    failures: list[str] = []
    source = None
    if from_db:
        read = database_source(settings.branch_dsn)

        def source() -> list[dict[str, Any]]:
            try:
                return read()
            except Exception as exc:
                # The type and the driver's first line (host, port, user: never the password).
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failures.append(f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__)
                raise
    directory = policy_directory(settings, policy_dir)
    try:
        engine = PolicyEngine(directory, entity_source=source, **engine_options)
    except FileNotFoundError as exc:
        raise click.ClickException(f"no policy at {directory} ({exc}); use --policy or set policy_dir") from None
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    return LoadedEngine(engine, from_db, failures[0] if failures else None)


def staff_unreadable(loaded: LoadedEngine) -> str:
    """What to tell a person when the branch database's staff could not be read."""
    return (f"staff entities could not be read from the branch database ({loaded.source_error}): check "
            "branch_dsn and that the database is up, or use --staff file (entities.json only)")
