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
    connector_state,
    ensure_connector,
    purge_raw_written_before_filter,
    wait_snapshot,
)
from guard.stack.controller import Controller
from guard.stack.errors import StackError
from guard.stack.postgres import SUPERUSER, Postgres
from guard.stack.procs import progress
from guard.stack.provision import bootstrap, seed
from guard.stack.redisd import Redis
from guard.stack.service import Service, ServiceStatus

SERVICES = ("controller", "broker", "connect", "postgres", "redis")

#: Services that run on the fetched Kafka jars.
_JVM_SERVICES = ("controller", "broker", "connect")


class Stack:
    """The five services of one stack home, built from one config."""

    def __init__(self, cfg: StackConfig | None = None, artifacts: Artifacts | None = None) -> None:
        self.cfg = cfg or StackConfig.from_env()
        self.redis = Redis(self.cfg)
        self.postgres = Postgres(self.cfg)
        self.controller = Controller(self.cfg, artifacts)
        self.broker = Broker(self.cfg, artifacts)
        self.connect = Connect(self.cfg, artifacts)

    def get(self, name: str) -> Service:
        services: dict[str, Service] = {"controller": self.controller, "broker": self.broker, "connect": self.connect,
                                        "postgres": self.postgres, "redis": self.redis}
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
        bootstrap(self.cfg, pg.admin_conninfo(), pg.admin_conninfo(self.cfg.branch_db), SUPERUSER)
        seed(self.cfg, self.cfg.branch_dsn)


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
    ensure_audit_key(cfg)
    stack = Stack(cfg).with_artifacts()
    stack.migrate_combined_kafka()
    for svc in (stack.redis, stack.postgres):
        svc.start()
    stack.start_kafka()
    stack.redis.wait_ready()
    stack.postgres.wait_ready()
    stack.provision_postgres()
    stack.broker.wait_ready()
    stack.connect.start()
    stack.connect.wait_ready()
    outcome = ensure_connector(cfg)
    purge_raw_written_before_filter(cfg, Catalog.load(), outcome)
    wait_snapshot(cfg)
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
        for name in ("connect", "broker", "controller", "postgres", "redis"):
            outcome = stack.get(name).stop()
            progress(f"{name}: {outcome}")


def _connector_status(cfg: StackConfig) -> ServiceStatus:
    name = f"connector {cfg.connector_name}"
    try:
        with httpx.Client(base_url=cfg.connect_url, timeout=3.0) as http:
            state, tasks, trace = connector_state(http, cfg.connector_name)
    except httpx.HTTPError:
        return ServiceStatus(name, False, "Connect not reachable")
    running = state == "RUNNING" and bool(tasks) and all(t == "RUNNING" for t in tasks)
    detail = f"connector {state}, tasks {tasks}" + (f": {trace}" if trace else "")
    return ServiceStatus(name, running, detail)


def status() -> list[ServiceStatus]:
    """What runs: one entry per service (pid and port) plus the Debezium connector."""
    stack = Stack()
    out = [stack.get(n).status() for n in SERVICES]
    out.append(_connector_status(stack.cfg))
    return out


def env() -> dict[str, str]:
    """Connection settings for guard components (GUARD_KAFKA_BOOTSTRAP, ...)."""
    return StackConfig.from_env().env()


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
    db_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=cfg.branch_db)
    superuser = psycopg.conninfo.conninfo_to_dict(admin_dsn).get("user") or "postgres"
    app_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=cfg.branch_db, user=cfg.app_user,
                                             password=cfg.app_password)
    bootstrap(cfg, admin_dsn, db_dsn, str(superuser))
    seed(cfg, app_dsn)
    ensure_connector(cfg, connect_url=connect_url, db_host=db_host, db_port=db_port, db_dsn=app_dsn)
