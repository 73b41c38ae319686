"""The local stack's credentials: random passwords in 0600 files under ``<home>/secrets`` (0700).

Nothing here prints a secret; ``guard stack env`` prints the *paths* (``GUARD_REDIS_PASSWORD_FILE``,
``GUARD_CONNECT_CREDENTIALS_FILE``, the ``passfile`` of ``GUARD_BRANCH_DSN``). Each service gets only the
files it needs, by path in its own configuration, never through an inherited environment.

| file | who reads it | what |
|---|---|---|
| ``redis-guard.password`` | the guard (``GUARD_REDIS_PASSWORD_FILE``) | Redis ACL user ``guard`` |
| ``redis-admin.password`` | the stack (migration, rotation, doctor's negative checks) | Redis ACL user ``admin`` |
| ``pg-superuser.pgpass`` | the stack (provisioning, rotation) | PostgreSQL superuser ``postgres`` (socket) |
| ``pgpass`` | the guard, the demo, tests (``passfile`` in ``GUARD_BRANCH_DSN``) | ``branch_app`` over TCP |
| ``connect-cdc.properties`` | Kafka Connect (``FileConfigProvider``) | Debezium's ``cdc`` password |
| ``connect-rest.credentials`` | REST clients (``GUARD_CONNECT_CREDENTIALS_FILE``) | ``user:password`` |

Rotation (``python -m guard.stack rotate redis|postgres``) writes new passwords here and applies them to
the running services (`guard.stack.rotate`).
"""

from __future__ import annotations

import hashlib
import os
import secrets as _random
from pathlib import Path

from guard.secretfile import create_private, read_private_text, write_private
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress

REDIS_GUARD_USER = "guard"
REDIS_ADMIN_USER = "admin"
CONNECT_REST_USER = "guard-admin"
PG_SUPERUSER = "postgres"


def read_secret(path: Path, *, create: bool = False) -> str:
    """A password from a file readable by its owner only; made (32 random hex bytes) when asked and missing.

    A file readable by group or others is refused, not used.
    """
    if not path.exists():
        if not create:
            raise StackError(f"{path} is missing; run `guard stack up` to create it")
        if create_private(path, _random.token_hex(24) + "\n"):
            progress(f"created the password file {path} (mode 0600)")
    value = read_private_text(path, "the password file", StackError)
    if len(value) < 16:
        raise StackError(f"{path} holds no usable password (16 characters at least); remove it to have one made")
    return value


def new_password() -> str:
    """32 URL-safe characters (192 bits); no ':' or '\\', so it fits pgpass and properties files as is."""
    return _random.token_urlsafe(24)


def sha256_hex(password: str) -> str:
    """The form Redis ACL files store passwords in (``#<sha256>``)."""
    return hashlib.sha256(password.encode()).hexdigest()


class StackSecrets:
    """Passwords of one stack home, created on first use."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.home / "secrets"

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.password"

    def password(self, name: str) -> str:
        """The password ``name`` (redis-guard, redis-admin, pg-superuser, pg-app, pg-cdc, connect-rest)."""
        self._ensure_dir()
        p = self.path(name)
        if not p.exists():
            write_private(p, new_password() + "\n")
        return p.read_text(encoding="utf-8").strip()

    def set_password(self, name: str, value: str) -> None:
        self._ensure_dir()
        write_private(self.path(name), value + "\n")

    # --- derived client files ------------------------------------------------------------------
    @property
    def redis_guard_file(self) -> Path:
        self.password("redis-guard")
        return self.path("redis-guard")

    @property
    def pgpass(self) -> Path:
        """libpq password file of the application role (TCP), named by ``passfile`` in the DSN."""
        return self.dir / "pgpass"

    @property
    def superuser_pgpass(self) -> Path:
        return self.dir / "pg-superuser.pgpass"

    @property
    def connect_cdc_properties(self) -> Path:
        return self.dir / "connect-cdc.properties"

    @property
    def connect_rest_credentials(self) -> Path:
        return self.dir / "connect-rest.credentials"

    def write_client_files(self) -> None:
        """(Re)write every derived file from the passwords (idempotent; after a rotation too)."""
        self._ensure_dir()
        c = self.cfg
        write_private(self.pgpass, f"{c.host}:{c.pg_port}:*:{c.app_user}:{self.password('pg-app')}\n")
        write_private(self.superuser_pgpass, f"*:{c.pg_port}:*:{PG_SUPERUSER}:{self.password('pg-superuser')}\n")
        write_private(self.connect_cdc_properties, f"password={self.password('pg-cdc')}\n")
        write_private(self.connect_rest_credentials, f"{CONNECT_REST_USER}:{self.password('connect-rest')}\n")
        self.password("redis-guard")
        self.password("redis-admin")
