"""``up`` / ``down`` / ``status`` / ``env`` / ``restart`` / ``kill`` for the whole local stack.

Start order follows the dependencies: Redis, PostgreSQL and the KRaft controller are spawned together (the
JVM start dominates, so overlapping saves time), the broker once the controller answers, then PostgreSQL
is provisioned, then Connect starts once the broker answers, then the Debezium connector is registered and
its snapshot awaited. Stop order is the reverse: Connect, broker, controller, PostgreSQL, Redis.
A home that still holds the combined broker+controller node of before stack-18 is migrated first
(`migrate_combined_kafka`).
Everything is idempotent: running services are left alone and stored data is kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from guard.classify.catalog import Catalog
from guard.stack.artifacts import Artifacts, ensure_artifacts
from guard.stack.broker import Broker
from guard.stack.config import StackConfig
from guard.stack.connect import Connect
from guard.stack.connector import (
    ENGINES,
    connector_name,
    connector_state,
    ensure_connector,
    purge_raw_written_before_filter,
    rest_auth,
    restart_connector,
    wait_snapshot,
)
from guard.stack.controller import Controller
from guard.stack.errors import StackError
from guard.stack.kafka_auth import ensure_security as ensure_kafka_security
from guard.stack.mariadb import MariaDB, provision_mariadb
from guard.stack.postgres import SUPERUSER, Postgres
from guard.stack.procs import private_dirs, progress
from guard.stack.provision import attribution_table_ddl, bootstrap, seed
from guard.stack.redisd import Redis
from guard.stack.secrets import REDIS_ADMIN_USER, REDIS_GUARD_USER, StackSecrets, new_password, sha256_hex
from guard.stack.service import Service, ServiceStatus
from guard.stack.tls import ensure_ca

SERVICES = ("controller", "broker", "connect", "postgres", "mariadb", "redis")

#: Services that run on the fetched Kafka jars.
_JVM_SERVICES = ("controller", "broker", "connect")


class Stack:
    """The six services of one stack home, built from one config."""

    def __init__(self, cfg: StackConfig | None = None, artifacts: Artifacts | None = None) -> None:
        self.cfg = cfg or StackConfig.from_env()
        self.redis = Redis(self.cfg)
        self.postgres = Postgres(self.cfg)
        self.mariadb = MariaDB(self.cfg)
        self.controller = Controller(self.cfg, artifacts)
        self.broker = Broker(self.cfg, artifacts)
        self.connect = Connect(self.cfg, artifacts)

    def get(self, name: str) -> Service:
        services: dict[str, Service] = {"controller": self.controller, "broker": self.broker, "connect": self.connect,
                                        "postgres": self.postgres, "mariadb": self.mariadb, "redis": self.redis}
        if name not in services:
            raise StackError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
        return services[name]

    def with_artifacts(self) -> Stack:
        """Download (once) what the JVM services need; nothing is started if that fails."""
        a = ensure_artifacts(self.cfg)
        self.controller.artifacts = a
        self.broker.artifacts = a
        self.connect.artifacts = a
        return self

    def migrate_combined_kafka(self) -> bool:
        """Replace a combined broker+controller node (the layout before stack-18) by controller + broker.

        The old node's metadata log names node 1 as the only voter, which the separate controller (node 100)
        cannot take over, so the Kafka data is removed and both nodes are formatted anew: topics and
        consumer offsets are re-created by their users, Connect re-creates its internal topics and the
        Debezium connector re-snapshots (its offsets lived in Kafka). A local dev stack; nothing else is lost.
        """
        if not self.broker.combined_layout():
            return False
        progress(f"kafka: {self.broker.dir} holds a combined broker+controller node (layout before stack-18); "
                 f"stopping Connect and the broker and removing the Kafka data to run a separate controller "
                 f"(node {self.cfg.controller_node_id}) and broker (node {self.cfg.broker_node_id}); topics are "
                 f"re-created and the Debezium connector re-snapshots")
        for svc in (self.connect, self.broker, self.controller):
            svc.stop()
        for d in (self.broker.data_dir, self.controller.data_dir):
            shutil.rmtree(d, ignore_errors=True)
        self.broker.killed_file.unlink(missing_ok=True)
        self.broker.pidfile.unlink(missing_ok=True)
        return True

    def start_kafka(self) -> None:
        """Controller first (and wait until it answers), then the broker (crash-aware, see `Broker.start`)."""
        self.controller.start()
        self.controller.wait_ready()
        self.broker.start()

    def provision_postgres(self) -> None:
        pg = self.postgres
        sec = StackSecrets(self.cfg)
        bootstrap(self.cfg, pg.admin_conninfo(), pg.admin_conninfo(self.cfg.branch_db), SUPERUSER,
                  sec.password("pg-app"), sec.password("pg-cdc"))
        seed(self.cfg, self.cfg.branch_dsn)

    def provision_mariadb(self) -> None:
        provision_mariadb(self.cfg, self.mariadb)

    # --- access (issue 20): credentials, CA, and the migration of a home from before it ------------------
    def secure_home(self) -> None:
        """Passwords, client files and the CA exist; services still running an open configuration restart.

        A home from before issue 20 runs Redis on a plaintext port with its default user, PostgreSQL with
        a trusted socket and no TLS, and Connect with an open REST API: each is stopped here (one line
        each) and started again below with the secured configuration.
        """
        StackSecrets(self.cfg).write_client_files()
        ensure_ca(self.cfg.home)
        for svc, was in ((self.connect, "an unauthenticated REST API"),
                         (self.postgres, "a trusted socket and no TLS"),
                         (self.mariadb, "plaintext TCP logins"),
                         (self.redis, "a plaintext port and its default user")):
            if svc.pid() is not None and not svc.secured():
                progress(f"{svc.name}: running with {was} (configured before issue 20); restarting it with "
                         f"TLS and passwords")
                progress(f"{svc.name}: {svc.stop()}")
    # --- end access (issue 20) -------------------------------------------------------------------------


# --- issue 20 (kafka part): JVM services still running with an older configuration ------------------------
def _rendered_now(stack: Stack, name: str) -> tuple[Path, str]:
    """(properties file, what `prepare` would write now) of controller, broker or connect."""
    from guard.stack.kraft import broker_properties, controller_properties

    cfg = stack.cfg
    if name == "controller":
        return stack.controller.properties, controller_properties(cfg, stack.controller.data_dir)
    if name == "broker":
        return stack.broker.properties, broker_properties(cfg, stack.broker.data_dir)
    text = stack.connect.rendered_properties() if cfg.kafka_password_file("connect").exists() else ""
    return stack.connect.properties, text


def restart_stale_jvm_services(stack: Stack) -> list[str]:
    """Stop the running controller, broker and Connect when their configuration is not what `up` writes now.

    A machine that keeps its stack running between runs (CI: `make test` leaves it up) would otherwise keep
    a broker from before issue 20 with its plaintext listener, and `up` would wait for a TLS listener that
    never comes. They are stopped gracefully (Connect, broker, controller) and started again by `up` with the
    new configuration; data is kept.
    """
    stale = []
    for name in ("controller", "broker", "connect"):
        svc = stack.get(name)
        if svc.pid() is None:
            continue
        path, text = _rendered_now(stack, name)
        try:
            current = path.read_text(encoding="utf-8")
        except OSError:
            current = ""
        if current != text:
            stale.append(name)
    if not stale:
        return []
    progress(f"kafka: {', '.join(stale)} run(s) with an older configuration (e.g. the plaintext listeners of "
             f"before TLS/SASL); stopping Connect, the broker and the controller to start them with the new one "
             f"(data is kept)")
    for name in ("connect", "broker", "controller") if {"controller", "broker"} & set(stale) else ("connect",):
        progress(f"{name}: {stack.get(name).stop()}")
    return stale
# --- end of issue 20 (kafka part) ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cfg: StackConfig) -> Iterator[None]:
    """Serialise lifecycle operations on one stack home (parallel test sessions call up() too)."""
    cfg.run.mkdir(parents=True, exist_ok=True)
    with open(cfg.run / "stack.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another stack operation is in progress; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def up() -> None:
    """Start (or confirm) every service, provision the branch DB, register the connector, wait."""
    cfg = StackConfig.from_env()
    with _locked(cfg):
        _up(cfg)


def _up(cfg: StackConfig) -> None:
    t0 = time.monotonic()
    progress(f"home {cfg.home}, cache {cfg.cache}")
    for d in (cfg.home, cfg.logs, cfg.run):
        d.mkdir(parents=True, exist_ok=True)
    # Kafka's segments (raw CDC records in clear), Redis's append-only file, Connect's and the pid files: root's
    # alone; the logs and the home only traversable by the database servers' OS users (`private_dirs`).
    private_dirs(cfg.home, traverse=(cfg.logs,),
                 private=(cfg.home / "kafka", cfg.home / "redis", cfg.home / "connect", cfg.run))
    ensure_audit_key(cfg)
    stack = Stack(cfg).with_artifacts()
    stack.migrate_combined_kafka()
    stack.secure_home()
    restart_stale_jvm_services(stack)
    for svc in (stack.redis, stack.postgres, stack.mariadb):
        svc.start()
    stack.start_kafka()
    stack.redis.wait_ready()
    stack.redis.reload_acl()
    stack.redis.migrate_keys()
    stack.postgres.wait_ready()
    stack.provision_postgres()
    stack.mariadb.wait_ready()
    stack.provision_mariadb()
    stack.broker.wait_ready()
    ensure_kafka_security(cfg)  # issue 20: SCRAM users and ACLs, before any SASL client (Connect) comes
    stack.connect.start()
    stack.connect.wait_ready()
    catalog = Catalog.load()
    for engine in ENGINES:
        outcome = ensure_connector(cfg, catalog=catalog, engine=engine)
        purge_raw_written_before_filter(cfg, catalog, outcome, engine)
        if engine == "mariadb" and outcome == "updated":
            # a connector registered before it captured the attribution table learns the table's shape
            stack.mariadb.admin(attribution_table_ddl(replace=True))
    for engine in ENGINES:
        wait_snapshot(cfg, engine=engine)
    progress(f"up in {time.monotonic() - t0:.1f}s")
    for k, v in cfg.env().items():
        progress(f"  {k}={v}")


def audit_key_file(cfg: StackConfig) -> Path:
    """The local stack's audit signing key: ``<home>/secrets/audit-signing.key`` (guard.audit.writer's default)."""
    return cfg.home / "secrets" / "audit-signing.key"


def ensure_audit_key(cfg: StackConfig) -> None:
    """Create the audit chain's Ed25519 signing key (0600) and its verifier key (`.pub`) once."""
    from guard.audit.note import generate_key_files

    path = audit_key_file(cfg)
    if not path.exists():
        generate_key_files(path)
        progress(f"audit: created the signing key {path} (mode 0600) and its verifier key {path.with_suffix('.pub')}")


def down() -> None:
    """Stop what the stack started (Connect first, Redis last). Data stays in the stack home."""
    stack = Stack()
    with _locked(stack.cfg):
        for name in ("connect", "broker", "controller", "postgres", "mariadb", "redis"):
            outcome = stack.get(name).stop()
            progress(f"{name}: {outcome}")


def _connector_status(cfg: StackConfig, connector: str) -> ServiceStatus:
    name = f"connector {connector}"
    try:
        with httpx.Client(base_url=cfg.connect_url, timeout=3.0, auth=rest_auth(cfg)) as http:
            state, tasks, trace = connector_state(http, connector)
    except httpx.HTTPError:
        return ServiceStatus(name, False, "Connect not reachable")
    running = state == "RUNNING" and bool(tasks) and all(t == "RUNNING" for t in tasks)
    detail = f"connector {state}, tasks {tasks}" + (f": {trace}" if trace else "")
    return ServiceStatus(name, running, detail)


def status() -> list[ServiceStatus]:
    """What runs: one entry per service (pid and port) plus the Debezium connector."""
    stack = Stack()
    out = [stack.get(n).status() for n in SERVICES]
    out.extend(_connector_status(stack.cfg, connector_name(stack.cfg, e)) for e in ENGINES)
    return out


def env() -> dict[str, str]:
    """Connection settings for guard components (GUARD_KAFKA_BOOTSTRAP, ...): where credentials are, not
    their values."""
    return StackConfig.from_env().env()


# --- access (issue 20): password rotation on the running stack ------------------------------------------
ROTATABLE = ("redis", "postgres")


def rotate(what: str) -> None:
    """New passwords for Redis (users guard and admin) or PostgreSQL (branch_app and cdc), applied live.

    Redis: each user first accepts its old and new passwords (the ACL file says so, and `ACL SETUSER` adds
    the new hash live), then the password files are replaced, then only the new ones are accepted (the
    file, and `ACL SETUSER` removes the old hash). Established connections stay connected: a password change
    with `ACL SETUSER` disconnects no one, where `ACL LOAD` on Redis 7.0 (Debian's) closes every client's
    connection, the one that sent it included. New connections read the new file (the guard's client reads
    its password file at every connection). PostgreSQL: ALTER ROLE,
    the pgpass / Connect secret files are replaced, and the connector's task restarts to read its new
    password. Nothing is printed but the outcome.
    """
    if what not in ROTATABLE:
        raise StackError(f"cannot rotate {what!r}; choose one of {', '.join(ROTATABLE)}")
    stack = Stack()
    with _locked(stack.cfg):
        if what == "redis":
            _rotate_redis(stack)
        else:
            _rotate_postgres(stack)


def _rotate_redis(stack: Stack) -> None:
    redis_svc, sec = stack.redis, StackSecrets(stack.cfg)
    if redis_svc.pid() is None:
        raise StackError("redis is not running; start it (`guard stack up`) before rotating its passwords")
    files = {REDIS_GUARD_USER: "redis-guard", REDIS_ADMIN_USER: "redis-admin"}
    old = {user: sec.password(name) for user, name in files.items()}
    new = {user: new_password() for user in files}
    admin = redis_svc.admin_client(socket_timeout=10)
    try:
        redis_svc.write_acl(also=new)  # old and new both valid, in the file a restart would load
        for user, password in new.items():
            admin.execute_command("ACL", "SETUSER", user, f"#{sha256_hex(password)}")  # adds a hash
        for user, name in files.items():
            sec.set_password(name, new[user])
        redis_svc.write_acl()  # new only
        for user, password in old.items():
            admin.execute_command("ACL", "SETUSER", user, f"!{sha256_hex(password)}")  # removes a hash
        redis_svc.remember_acl()  # the file and the live rules agree: the next `up` loads nothing
    finally:
        admin.close()
    progress(f"redis: passwords of users {REDIS_GUARD_USER} and {REDIS_ADMIN_USER} rotated "
             f"(files in {sec.dir})")


def _rotate_postgres(stack: Stack) -> None:
    import psycopg
    from psycopg import sql

    cfg, pg, sec = stack.cfg, stack.postgres, StackSecrets(stack.cfg)
    if pg.pid() is None:
        raise StackError("postgres is not running; start it (`guard stack up`) before rotating its passwords")
    new = {"pg-app": (cfg.app_user, new_password()), "pg-cdc": (cfg.cdc_user, new_password())}
    with psycopg.connect(pg.admin_conninfo(), autocommit=True) as conn:
        for role, password in new.values():
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    for name, (_, password) in new.items():
        sec.set_password(name, password)
    sec.write_client_files()
    if stack.connect.pid() is not None:
        restart_connector(cfg)
    progress(f"postgres: passwords of roles {cfg.app_user} and {cfg.cdc_user} rotated (files in {sec.dir}); "
             f"the connector restarted with its new password")
# --- end access (issue 20) -------------------------------------------------------------------------------


def restart(service: str) -> None:
    """Graceful stop then start of one service, waiting until it answers again."""
    stack = Stack()
    svc = stack.get(service)
    with _locked(stack.cfg):
        if service in _JVM_SERVICES:
            stack.with_artifacts()
        if service in ("controller", "broker") and stack.migrate_combined_kafka():
            stack.start_kafka()
            stack.broker.wait_ready()
            return
        progress(f"{service}: {svc.stop()}")
        svc.start()
        svc.wait_ready()


def kill(service: str) -> None:
    """SIGKILL one service (its whole process group): a crash, for reliability tests. No restart.

    Killing the broker records the time of death (``<home>/run/broker.killed``) for its crash-aware start.
    """
    svc = Stack().get(service)
    svc.kill()
    progress(f"{service}: killed")


def start(service: str) -> None:
    """Start one (stopped or killed) service and wait until it answers."""
    stack = Stack()
    svc = stack.get(service)
    with _locked(stack.cfg):
        if service in _JVM_SERVICES:
            stack.with_artifacts()
        if service in ("controller", "broker"):
            stack.migrate_combined_kafka()
        if service == "broker" and stack.controller.pid() is None:
            progress("broker: the controller is not running; starting it first")
            stack.controller.start()
            stack.controller.wait_ready()
        svc.start()
        svc.wait_ready()


def provision(admin_dsn: str, connect_url: str, db_host: str, db_port: int) -> None:
    """Set up an externally run stack (docker-compose): provision PostgreSQL, register the connector.

    ``admin_dsn`` is a superuser DSN for the ``postgres`` database; the branch database and roles are
    created from it. Connect reaches the database at ``db_host:db_port`` (its own network view).
    """
    import psycopg.conninfo

    cfg = StackConfig.from_env()
    sec = StackSecrets(cfg)  # docker-compose mounts the secrets directory (GUARD_STACK_HOME/secrets)
    db_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=cfg.branch_db)
    superuser = psycopg.conninfo.conninfo_to_dict(admin_dsn).get("user") or "postgres"
    app_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=cfg.branch_db, user=cfg.app_user,
                                             password=sec.password("pg-app"))
    bootstrap(cfg, admin_dsn, db_dsn, str(superuser), sec.password("pg-app"), sec.password("pg-cdc"))
    seed(cfg, app_dsn)
    ensure_connector(cfg, connect_url=connect_url, db_host=db_host, db_port=db_port, db_dsn=app_dsn,
                     cdc_password_file=os.environ.get("GUARD_CONNECT_CDC_PASSWORD_FILE"),
                     ca_file=os.environ.get("GUARD_CONNECTOR_CA_FILE"),
                     auth=rest_auth(cfg))


def provision_mariadb_external(admin_dsn: str, connect_url: str, bootstrap: str) -> None:
    """Set up the MariaDB branch of an externally run stack (docker-compose): accounts, schema, seed, connector.

    ``admin_dsn`` (``mysql://root:<password>@mariadb:3306/``) is an account that may create databases and users;
    the accounts are made for logins from any host of the compose network ('%'). The CDC and application
    passwords are read from (or made in) their files under the secrets directory (a volume). Connect reaches
    the server and the broker at the admin DSN's host and port and at ``bootstrap`` (its own network view).
    """
    from urllib.parse import urlsplit

    from guard.stack.mariadb import ensure_blackhole, write_connect_cdc_file
    from guard.stack.provision import mariadb_bootstrap_sql, seed_mariadb, sql_statements
    from guard.workload.branch import MariaConnection

    cfg = StackConfig.from_env()
    url = urlsplit(admin_dsn)
    host, port = url.hostname or "mariadb", url.port or 3306
    app_dsn = cfg.mariadb_dsn_at(host, port)
    with MariaConnection(admin_dsn) as conn:
        def admin(script: str) -> None:
            for statement in sql_statements(script):
                conn.execute(statement)

        ensure_blackhole(lambda sql: "\n".join("\t".join(str(v) for v in row)
                                                for row in conn.execute(sql).fetchall()), admin)
        admin(mariadb_bootstrap_sql(cfg, client_host="%"))
        write_connect_cdc_file(cfg)
        seed_mariadb(cfg, app_dsn, admin)
        outcome = ensure_connector(cfg, connect_url=connect_url, db_host=host, db_port=port, db_dsn=app_dsn,
                                   engine="mariadb", bootstrap=bootstrap, auth=rest_auth(cfg))
        if outcome == "updated":  # see _up: the connector learns the attribution table's shape
            admin(attribution_table_ddl(replace=True))
