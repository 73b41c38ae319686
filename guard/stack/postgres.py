"""PostgreSQL 15 demo branch database: a private cluster (initdb) under the stack home.

Why a private cluster instead of Debian's: it needs ``wal_level=logical`` and a non-default port, and
the stack must not touch the machine's own databases. PostgreSQL refuses to run as root, so when we
are root the cluster belongs to the ``postgres`` OS user and its commands run through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import child_env, pid_alive, progress, read_pid, tail
from guard.stack.secrets import StackSecrets
from guard.stack.service import Service
from guard.stack.tls import ensure_server_cert

PG_MAJOR = "15"
PG_BIN = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
SUPERUSER = "postgres"
INCLUDE_LINE = "include = 'branchguard.conf'"
#: In the data dir once the superuser has a password (initdb --pwfile, or the migration of an older cluster).
AUTH_MARKER = "branchguard-auth"


def _bin(name: str) -> str:
    path = PG_BIN / name
    if not path.exists():
        raise StackError(f"{path} is missing; run scripts/setup.sh (apt-get install postgresql-{PG_MAJOR}).")
    return str(path)


class Postgres(Service):
    name = "postgres"
    port_env = "GUARD_PG_PORT"
    # SIGINT = "fast" shutdown. SIGTERM ("smart") would wait forever for Debezium's replication
    # connection to go away.
    stop_signal = signal.SIGINT
    ready_timeout = 60.0

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__(cfg)
        self.dir = cfg.home / "postgres"
        self.as_root = os.geteuid() == 0

    @property
    def port(self) -> int:
        return self.cfg.pg_port

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.dir / "run"

    @property
    def marker(self) -> str:
        return str(self.data_dir)

    def pid(self) -> int | None:
        """The postmaster's own pid file is the truth (our spawned pid is runuser's when root)."""
        pid = read_pid(self.data_dir / "postmaster.pid")
        if pid is not None and pid_alive(pid, self.marker):
            return pid
        return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, then wait until the pid is really gone.

        A killed postmaster can linger as a zombie until its (re)parent reaps it; PostgreSQL treats
        a postmaster.pid naming a still-existing pid as "another postmaster is running" and refuses
        to start, so a quick restart after a crash would fail.
        """
        pid = self.pid()
        super().kill()
        if pid is not None:
            deadline = time.monotonic() + 10
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.1)

    def _clear_stale_lock(self) -> None:
        """Remove postmaster.pid if it names a dead or zombie process (crash leftovers)."""
        lock = self.data_dir / "postmaster.pid"
        pid = read_pid(lock)
        if pid is None or pid_alive(pid):
            return
        if psutil.pid_exists(pid):  # a zombie: PostgreSQL's own kill(pid, 0) check would see it alive
            progress(f"postgres: removing stale postmaster.pid of crashed pid {pid}")
            lock.unlink(missing_ok=True)

    # --- OS user handling --------------------------------------------------------------------
    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--", *argv] if self.as_root else argv

    def _chown(self, path: Path) -> None:
        if self.as_root:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _owner_can_reach(self, path: Path) -> bool:
        return subprocess.run(["runuser", "-u", SUPERUSER, "--", "test", "-w", str(path)],
                              check=False, capture_output=True).returncode == 0

    def _grant_traverse(self) -> None:
        """Let the postgres user reach a stack home below a private dir (e.g. /root is 0700).

        Only the search (x) permission is added, for that one user, via an ACL on each ancestor.
        """
        if self._owner_can_reach(self.dir):
            return
        setfacl = shutil.which("setfacl")
        if setfacl is None:
            raise StackError(f"the '{SUPERUSER}' OS user cannot reach {self.dir}. Install the acl package "
                             f"(scripts/setup.sh) or set GUARD_STACK_HOME to a directory outside /root.")
        for parent in reversed(self.dir.parents):
            if not self._owner_can_reach_dir(parent):
                progress(f"postgres: granting user {SUPERUSER} search (x) access on {parent} via ACL")
                subprocess.run([setfacl, "-m", f"u:{SUPERUSER}:x", str(parent)], check=True)
        if not self._owner_can_reach(self.dir):
            raise StackError(f"the '{SUPERUSER}' OS user still cannot write {self.dir}; "
                             f"set GUARD_STACK_HOME to a directory it can reach.")

    def _owner_can_reach_dir(self, path: Path) -> bool:
        return subprocess.run(["runuser", "-u", SUPERUSER, "--", "test", "-x", str(path)],
                              check=False, capture_output=True).returncode == 0

    # --- Service hooks -----------------------------------------------------------------------
    def prepare(self) -> None:
        for d in (self.dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        os.chmod(self.socket_dir, 0o700)
        if self.as_root:
            self._grant_traverse()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._secure_data_dir()
        conf = self.data_dir / "postgresql.conf"
        if INCLUDE_LINE not in conf.read_text(encoding="utf-8"):
            with open(conf, "a", encoding="utf-8") as fh:
                fh.write(f"\n# BranchGuard settings\n{INCLUDE_LINE}\n")
        write_if_changed(self.data_dir / "branchguard.conf", render_asset(
            "postgresql.conf", host=self.cfg.host, port=self.cfg.pg_port, socket_dir=self.socket_dir), 0o600)
        write_if_changed(self.data_dir / "pg_hba.conf", render_asset("pg_hba.conf"), 0o600)
        for fname in ("branchguard.conf", "pg_hba.conf"):
            self._chown(self.data_dir / fname)
        # postgres handles a stale postmaster.pid naming a vanished pid itself; zombies are ours to clear
        self._clear_stale_lock()

    def _initdb(self) -> None:
        progress(f"postgres: initdb {self.data_dir}")
        log = self.cfg.logs / "postgres-initdb.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # the superuser's password from the start (initdb reads it from a file the postgres user can read,
        # removed right after); no connection is ever trusted
        pwfile = self.dir / ".initdb-pw"
        self._write_owned(pwfile, StackSecrets(self.cfg).password("pg-superuser") + "\n")
        try:
            with open(log, "ab") as out:
                rc = subprocess.run(
                    self._as_owner([_bin("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "-E", "UTF8",
                                    "--locale=C.UTF-8", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                                    f"--pwfile={pwfile}", "--no-instructions"]),
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
                    cwd=str(self.dir), env=child_env(self.spawn_env())).returncode
        finally:
            pwfile.unlink(missing_ok=True)
        if rc != 0:
            raise StackError(f"postgres: initdb failed (exit {rc}).\n{tail(log)}")
        self._write_owned(self.data_dir / AUTH_MARKER, "superuser password set by initdb\n")

    # --- access (issue 20): TLS certificate, superuser password, migration of older data dirs ----------
    def _write_owned(self, path: Path, text: str) -> None:
        """A 0600 file owned by the cluster's OS user (it must read it; nobody else may)."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        self._chown(path)

    def secured(self) -> bool:
        """False for a cluster configured before issue 20 (trusted socket, no TLS): `up` restarts it."""
        hba = self.data_dir / "pg_hba.conf"
        try:
            return "hostssl" in hba.read_text(encoding="utf-8") and (self.data_dir / AUTH_MARKER).exists()
        except OSError:
            return False

    def _secure_data_dir(self) -> None:
        """Server certificate into the data dir; a superuser password for a cluster that had none."""
        crt, key = ensure_server_cert(self.cfg.home, "postgres")
        for src, dest in ((crt, "server.crt"), (key, "server.key")):
            data = src.read_text(encoding="utf-8")
            target = self.data_dir / dest
            if not target.exists() or target.read_text(encoding="utf-8") != data:
                self._write_owned(target, data)
        if (self.data_dir / AUTH_MARKER).exists():
            return
        progress("postgres: this cluster predates scram-only access (its socket was trusted); setting a "
                 "superuser password (single-user mode) before switching to scram-sha-256 + TLS")
        password = StackSecrets(self.cfg).password("pg-superuser")
        stmt = f"ALTER ROLE {SUPERUSER} PASSWORD '{password}'\n"  # token_urlsafe: no quote to escape
        proc = subprocess.run(self._as_owner([_bin("postgres"), "--single", "-D", str(self.data_dir), "postgres"]),
                              input=stmt.encode(), capture_output=True, check=False, cwd=str(self.dir),
                              env=child_env(self.spawn_env()))
        if proc.returncode != 0:
            raise StackError(f"postgres: setting the superuser password failed (exit {proc.returncode}); is the "
                             f"cluster still running? Stop it (`guard stack down`) and run `guard stack up` again.")
        self._write_owned(self.data_dir / AUTH_MARKER, "superuser password set by guard.stack (migration)\n")

    def argv(self) -> list[str]:
        return self._as_owner([_bin("postgres"), "-D", str(self.data_dir)])

    def spawn_env(self) -> dict[str, str]:
        return {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """Superuser connection over the private Unix socket; scram password from its 0600 pgpass file."""
        return (f"host={self.socket_dir} port={self.cfg.pg_port} user={SUPERUSER} dbname={dbname} "
                f"passfile={StackSecrets(self.cfg).superuser_pgpass}")

    def ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.admin_conninfo(), connect_timeout=3) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
