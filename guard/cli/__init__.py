"""The `guard` command line: one module per command group, all registered on `main`.

Owns: `main` (the group, settings and logging), `stack`, `sanitize` (`run`, `sanitize`), `demo`,
`classify`, `connector` (`render`, `apply`), `erasure` (`erase`, `retention`, `hold`), `keys` (`keys-init`),
`doctor`, `bench`, `alerts` (`tail`, `analyze`, `serve`), `policy` (`validate`, `check`), `reveal` (`serve`,
`token`), `transfer` (`plan`, `start`, `cutover`, `complete`, `status`, `report`). Commands import
what they run inside their function, so `guard --help` stays quick.
May import: anything in `guard` (the top of docs/architecture.md); nothing imports it but entry points.
"""

from guard.cli import (  # noqa: F401 (registers the commands)
    alerts,
    audit,
    bench,
    classify,
    connector,
    demo,
    doctor,
    erasure,
    keys,
    policy,
    reveal,
    sanitize,
    stack,
    transfer,
)
from guard.cli.main import main

__all__ = ["main"]
