"""Access to the files in ``guard/stack/assets`` (config templates, SQL, throwaway Maven poms).

Templates use ``string.Template`` ``${name}`` placeholders and are rendered strictly: a missing value
is a bug in this package, so it raises instead of leaving a literal ``${...}`` in a config file.
"""

from __future__ import annotations

import os
import string
from importlib import resources
from pathlib import Path


def read_asset(name: str) -> str:
    """Return the text of one packaged asset."""
    return resources.files("guard.stack").joinpath("assets", name).read_text(encoding="utf-8")


def render_asset(name: str, **values: object) -> str:
    """Render an asset template with ``${key}`` placeholders; every placeholder must be given."""
    return string.Template(read_asset(name)).substitute({k: str(v) for k, v in values.items()})


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` atomically; return True when the content changed (so callers can warn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    # created with its final mode: a 0600 file (secrets, ACLs) is never readable by others, not even briefly
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    tmp.replace(path)
    return True
