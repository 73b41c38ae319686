"""Files that hold a secret (keys, passwords, salts, ACLs): private from their first byte, refused when loose.

Every secret the guard or its local stack keeps on disk goes through here, so three rules hold everywhere
and are tested once (tests/unit/test_secretfile.py):

* a secret file is *created* with mode 0600 (``os.open(..., O_CREAT | O_EXCL, 0o600)``), never written
  and chmod-ed afterwards, so no other user can open it in between; its directory is made 0700 when new;
* replacing one is atomic (a temporary file of the same mode, then ``rename``): a crash leaves the old
  secret or the new one, never half of one;
* a secret file that group or others may read is *refused*, not used, with the command that fixes it: a
  key that others could read must be treated as known to them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Owner read/write only.
PRIVATE_MODE = 0o600


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def _make_parent(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes | str) -> None:
    """Atomically replace ``path`` with ``data``; the file is mode 0600 from its first byte."""
    _make_parent(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_as_bytes(data))
    os.replace(tmp, path)


def create_private(path: Path, data: bytes | str) -> bool:
    """Create ``path`` (mode 0600) holding ``data`` unless it exists; True when this call created it.

    Exclusive creation makes concurrent first uses safe: when two processes race to mint a key, one
    creates it and the other gets False and reads the winner's (never two different keys in use).
    """
    _make_parent(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(_as_bytes(data))
    return True


def loose_mode(path: Path) -> int | None:
    """The file's permission bits when group or others have any access to it; None when it is private."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o077 else None


def refuse_loose(path: Path, what: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``what`` and the fix when ``path`` is readable beyond its owner."""
    mode = loose_mode(path)
    if mode is not None:
        raise error(f"{what} {path} is readable by other users (mode {mode:04o}); a secret file must be readable "
                    f"by its owner only: run `chmod 600 {path}` (and treat the secret as exposed)")


def read_private_text(path: Path, what: str, error: type[Exception]) -> str:
    """The stripped text of a private secret file; ``error`` when it is readable beyond its owner."""
    refuse_loose(path, what, error)
    return path.read_text(encoding="utf-8").strip()
