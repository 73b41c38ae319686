"""MariaDB 10.11 (Debian's ``mariadb-server``): the second branch database (branch 0202), a private server.

Why a private server instead of Debian's: Debezium needs the binlog in ROW format with full row images and
a server id, the port must be the stack's own, and the stack must not touch the machine's databases. It
runs like the stack's PostgreSQL: its data directory under the stack home (``mariadb-install-db`` once),
a config file read with ``--defaults-file`` only, as the ``mysql`` OS user when we are root (``user =
mysql`` in the config; mariadbd drops root itself).

Access: the server listens on 127.0.0.1 only, and over TCP with TLS only (``require_secure_transport``; its
certificate from the stack CA, `guard.stack.tls`). ``root`` logs in only through the Unix socket in a 0700
directory (``unix_socket`` authentication: the OS user must be root), there is no anonymous account and no
test database; the application role ``branch_app`` and the CDC role ``cdc`` log in over TCP with
passwords, random, in ``<home>/secrets/mariadb-app.password`` and ``mariadb-cdc.password`` (0600); the CDC role
has only what Debezium's MariaDB connector needs (``provision_mariadb``). Connect reads the CDC password and
the truststore's password through its FileConfigProvider, so neither is in the connector's config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from guard.secretfile import write_private
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.osuser import OsUserService
from guard.stack.procs import pid_alive, progress, read_pid, tail
from guard.stack.secrets import read_secret
from guard.stack.tls import ensure_server_cert

OS_USER = "mysql"
MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = "mariadb-install-db"
CLIENT = "mariadb"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} is missing; run scripts/setup.sh (apt-get install mariadb-server).")
    return found


class MariaDB(OsUserService):
    name = "mariadb"
    os_user = OS_USER
    port_env = "GUARD_MARIADB_PORT"
    ready_timeout = 90.0

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__(cfg, "mariadb")

    @property
    def port(self) -> int:
        return self.cfg.mariadb_port

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.dir / "run"

    @property
    def socket(self) -> Path:
        return self.socket_dir / "mariadb.sock"

    @property
    def conf(self) -> Path:
        return self.dir / "mariadb.cnf"

    @property
    def marker(self) -> str:
        return str(self.conf)

    @property
    def tls_dir(self) -> Path:
        """The server's certificate, key and the CA, readable by the mysql OS user (the stack's tls/ is not)."""
        return self.dir / "tls"

    def secured(self) -> bool:
        """False for a server configured before TLS (no ``require_secure_transport``): `up` restarts it."""
        try:
            return "require_secure_transport = ON" in self.conf.read_text(encoding="utf-8")
        except OSError:
            return False

    def _install_tls(self) -> None:
        crt, key = ensure_server_cert(self.cfg.home, "mariadb")
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.tls_dir)
        os.chmod(self.tls_dir, 0o700)
        for src, name in ((crt, "server.crt"), (key, "server.key"), (self.cfg.ca_file, "ca.crt")):
            data = src.read_text(encoding="utf-8")
            target = self.tls_dir / name
            if not target.exists() or target.read_text(encoding="utf-8") != data:
                write_private(target, data)
            self._chown(target)

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        if pid is not None and pid_alive(pid, self.marker):
            return pid
        return None

    def prepare(self) -> None:
        for d in (self.dir, self.socket_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        os.chmod(self.socket_dir, 0o700)
        os.chmod(self.data_dir, 0o700)
        if self.as_root:
            self._grant_traverse()
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        log_error = self.cfg.logs / "mariadb.log"
        if not log_error.exists():
            log_error.touch()
        self._chown(log_error)
        self._install_tls()
        write_if_changed(self.conf, render_asset(
            "mariadb.cnf", data_dir=self.data_dir, socket=self.socket, pid_file=self.dir / "run" / "mariadbd.pid",
            log_error=log_error, port=self.cfg.mariadb_port, host=self.cfg.host,
            binlog=self.data_dir / "binlog", server_id=self.cfg.mariadb_server_id,
            ssl_ca=self.tls_dir / "ca.crt", ssl_cert=self.tls_dir / "server.crt",
            ssl_key=self.tls_dir / "server.key"), 0o644)
        if not (self.data_dir / "mysql").is_dir():
            self._install_db()

    def _install_db(self) -> None:
        progress(f"mariadb: mariadb-install-db {self.data_dir}")
        log = self.cfg.logs / "mariadb-install.log"
        with open(log, "ab") as out:
            rc = subprocess.run(
                [_tool(INSTALL_DB), f"--defaults-file={self.conf}", "--auth-root-authentication-method=socket",
                 "--skip-test-db", *([f"--user={OS_USER}"] if self.as_root else [])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
                cwd=str(self.dir)).returncode
        if rc != 0:
            raise StackError(f"mariadb: mariadb-install-db failed (exit {rc}).\n{tail(log)}")

    def argv(self) -> list[str]:
        if not MARIADBD.exists():
            raise StackError(f"{MARIADBD} is missing; run scripts/setup.sh (apt-get install mariadb-server).")
        # --defaults-file must come first; the stack's pid file is the spawned mariadbd itself
        return [str(MARIADBD), f"--defaults-file={self.conf}"]

    def admin(self, sql: str, database: str | None = None, *, timeout: float = 60.0) -> str:
        """Run SQL as ``root`` through the private socket (unix_socket authentication); returns stdout (TSV)."""
        argv = [_tool(CLIENT), "--no-defaults", f"--socket={self.socket}", "--user=root", "--batch",
                "--skip-column-names"]
        if database:
            argv.append(f"--database={database}")
        done = subprocess.run(argv, input=sql.encode(), capture_output=True, check=False, timeout=timeout)
        if done.returncode != 0:
            raise StackError(f"mariadb: admin SQL failed: {done.stderr.decode(errors='replace').strip()[:500]}")
        return done.stdout.decode()

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        return self.admin("SELECT 1", timeout=10).strip() == "1"


def write_connect_cdc_file(cfg: StackConfig) -> Path:
    """``password=<cdc password>`` for Connect's FileConfigProvider (0600), from the CDC password file."""
    text = f"password={read_secret(cfg.mariadb_cdc_password_file, create=True)}\n"
    path = cfg.mariadb_connect_cdc_file
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_private(path, text)
    return path


def write_truststore(cfg: StackConfig) -> Path:
    """A PKCS#12 truststore of the stack CA for the MariaDB connector (Java has no PEM truststore for JDBC),
    with a random password in ``connect-mariadb-truststore.properties`` (0600, FileConfigProvider)."""
    from guard.stack.jvm import java

    store = cfg.mariadb_truststore
    props = cfg.mariadb_truststore_properties
    password = read_secret(cfg.secrets_dir / "mariadb-truststore.password", create=True)
    ca_pem = cfg.ca_file.read_bytes()
    stamp = store.with_name(store.name + ".ca")
    if not store.exists() or not stamp.exists() or stamp.read_bytes() != ca_pem:
        store.unlink(missing_ok=True)
        keytool = str(Path(java()).with_name("keytool"))
        done = subprocess.run([keytool, "-importcert", "-noprompt", "-alias", "branchguard-ca", "-file",
                               str(cfg.ca_file), "-keystore", str(store), "-storetype", "PKCS12",
                               "-storepass:file", str(cfg.secrets_dir / "mariadb-truststore.password")],
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise StackError(f"keytool could not make {store}: {done.stderr.decode(errors='replace')[:300]}")
        os.chmod(store, 0o600)
        write_private(stamp, ca_pem.decode())
    text = f"password={password}\n"
    if not props.exists() or props.read_text(encoding="utf-8") != text:
        write_private(props, text)
    return store


def provision_mariadb(cfg: StackConfig, server: MariaDB) -> None:
    """Database, accounts (least privilege, random passwords in 0600 files), Connect's password and truststore
    files, schema and seed rows."""
    from guard.stack.provision import mariadb_bootstrap_sql, seed_mariadb

    ensure_blackhole(server.admin, server.admin)
    server.admin(mariadb_bootstrap_sql(cfg))
    write_connect_cdc_file(cfg)
    write_truststore(cfg)
    seed_mariadb(cfg, cfg.mariadb_dsn, server.admin)


def ensure_blackhole(query: Callable[[str], str], run: Callable[[str], object]) -> None:
    """The BLACKHOLE storage engine, which the attribution table uses (binlogged, never stored: docs/policy.md):
    Debian's MariaDB ships it as a plugin that is not installed by default. `INSTALL SONAME` records it in
    `mysql.plugin`, so it loads at every later start; asked only when the engine is missing."""
    if query("SELECT SUPPORT FROM information_schema.ENGINES WHERE ENGINE = 'BLACKHOLE'").strip() in ("YES",
                                                                                                     "DEFAULT"):
        return
    progress("mariadb: installing the BLACKHOLE storage engine (INSTALL SONAME 'ha_blackhole')")
    run("INSTALL SONAME 'ha_blackhole'")
