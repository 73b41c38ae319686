"""Database servers that refuse to run as root: files, commands and directory access for their OS user.

PostgreSQL refuses to run as root and mariadbd drops to ``mysql``; when the stack runs as root, each
server's data directory belongs to that OS user, its commands run through ``runuser``, and a stack home
below a private directory (``/root`` is 0700) gets search permission for that one user on each ancestor
through an ACL, nothing wider. One base class holds this for both, so the two engines can't drift apart.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress
from guard.stack.service import Service


class OsUserService(Service):
    """A `Service` whose server runs as `os_user` when the stack runs as root; `dir` is its stack folder."""

    os_user: str = ""

    def __init__(self, cfg: StackConfig, folder: str) -> None:
        super().__init__(cfg)
        self.dir = cfg.home / folder
        self.as_root = os.geteuid() == 0

    def _as_owner(self, argv: list[str]) -> list[str]:
        """`argv` run as the OS user when we are root, else as is."""
        return ["runuser", "-u", self.os_user, "--", *argv] if self.as_root else argv

    def _chown(self, path: Path) -> None:
        """Give `path` to the OS user (root only; otherwise we are that user already)."""
        if self.as_root:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _owner_can(self, path: Path, test_flag: str) -> bool:
        """Whether the OS user passes ``test <flag> path`` (``-w`` write, ``-x`` search)."""
        return subprocess.run(["runuser", "-u", self.os_user, "--", "test", test_flag, str(path)],
                              check=False, capture_output=True).returncode == 0

    def _grant_traverse(self) -> None:
        """Let the OS user reach a stack home below a private directory (search permission only, by ACL)."""
        if not self.as_root or self._owner_can(self.dir, "-w"):
            return
        setfacl = shutil.which("setfacl")
        if setfacl is None:
            raise StackError(f"the '{self.os_user}' OS user cannot reach {self.dir}. Install the acl package "
                             f"(scripts/setup.sh) or set GUARD_STACK_HOME to a directory outside /root.")
        for parent in reversed(self.dir.parents):
            if not self._owner_can(parent, "-x"):
                progress(f"{self.name}: granting user {self.os_user} search (x) access on {parent} via ACL")
                subprocess.run([setfacl, "-m", f"u:{self.os_user}:x", str(parent)], check=True)
        if not self._owner_can(self.dir, "-w"):
            raise StackError(f"the '{self.os_user}' OS user still cannot write {self.dir}; "
                             f"set GUARD_STACK_HOME to a directory it can reach.")
