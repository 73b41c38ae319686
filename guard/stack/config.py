"""Where the local stack keeps things and which ports it uses.

Two roots, on purpose:
* the *cache* (``$GUARD_CACHE_DIR``, default ``~/.cache/branchguard``) holds downloads — the Maven
  repository, Kafka/Connect jars and Debezium plugins. It can be wiped at any time (costs a re-download).
* the *home* (``$GUARD_STACK_HOME``, default ``~/.local/share/branchguard``) holds runtime state —
  Kafka log dirs, the PostgreSQL cluster, the Redis AOF, logs and pid files. Wiping it loses data.

Neither lives in the repository, so a ``git clean`` never destroys a running stack's data.
Ports are non-default (19092, 18083, 15432, 16379) to avoid clashing with a developer's own
Kafka/PostgreSQL/Redis; each can be overridden by an environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from guard.stack.errors import StackError

        raise StackError(f"{name}={raw!r} is not a port number; unset it or give an integer") from None


@dataclass(frozen=True)
class StackConfig:
    """Immutable description of one local stack (paths, versions, ports, names)."""

    home: Path
    cache: Path
    kafka_version: str = "4.3.1"
    connect_version: str = "4.3.1"
    debezium_version: str = "3.6.1.Final"
    host: str = "127.0.0.1"
    kafka_port: int = 19092
    controller_port: int = 19093
    #: The broker's mutual-TLS listener (inter-broker traffic and the stack's own admin client; issue 20).
    #: 0: `kafka_port` + 2 (19094 by default).
    kafka_internal_port: int = 0
    #: KRaft node ids: the broker is node 1, the separate controller process node 100 (guard.stack.kraft).
    broker_node_id: int = 1
    controller_node_id: int = 100
    #: The controller fences a broker whose heartbeats stop for this long (Kafka's default, set explicitly).
    broker_session_timeout_ms: int = 9000
    connect_port: int = 18083
    pg_port: int = 15432
    redis_port: int = 16379
    branch_db: str = "branch_0101"
    app_user: str = "branch_app"
    cdc_user: str = "cdc"
    topic_prefix: str = "br0101"
    connector_name: str = "branch-0101-postgres"
    slot_name: str = "dbz_branch_0101"
    publication_name: str = "dbz_branch_0101"
    seed: int = 101
    seed_customers: int = 200
    # --- the second branch, on MariaDB (guard/stack/mariadb.py, connectors/branch-mariadb.json) --------------
    #: Debezium's MariaDB connector: 3.5.0.Final, the newest on Maven Central (3.6.x is not published there);
    #: it runs as a plugin of its own (own directory, own class loader) beside the 3.6.1 PostgreSQL plugin.
    mariadb_debezium_version: str = "3.5.0.Final"
    mariadb_port: int = 13306
    mariadb_db: str = "branch_0202"
    mariadb_branch: str = "0202"
    mariadb_topic_prefix: str = "br0202"
    mariadb_connector_name: str = "branch-0202-mariadb"
    #: The binlog's server id (GTID domain 0): unique in the replication topology; Debezium reads as
    #: another server id (``database.server.id`` in the connector).
    mariadb_server_id: int = 202
    mariadb_app_user: str = "branch_app"
    mariadb_cdc_user: str = "cdc"
    #: ``GUARD_BRANCH2_CDC_PASSWORD_FILE``: another place for the CDC password file (empty: under the home).
    mariadb_cdc_password_path: str = ""
    mariadb_seed: int = 202

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StackConfig:
        """Build the config from ``GUARD_*`` environment variables (all optional)."""
        e = os.environ if environ is None else environ
        home = Path(e.get("GUARD_STACK_HOME") or Path.home() / ".local/share/branchguard").expanduser()
        cache = Path(e.get("GUARD_CACHE_DIR") or Path.home() / ".cache/branchguard").expanduser()
        kafka_version = e.get("GUARD_KAFKA_VERSION") or cls.kafka_version
        return cls(
            home=home.absolute(),
            cache=cache.absolute(),
            kafka_version=kafka_version,
            kafka_port=_int_env(e, "GUARD_KAFKA_PORT", cls.kafka_port),
            controller_port=_int_env(e, "GUARD_CONTROLLER_PORT", cls.controller_port),
            kafka_internal_port=_int_env(e, "GUARD_KAFKA_INTERNAL_PORT", cls.kafka_internal_port),
            connect_port=_int_env(e, "GUARD_CONNECT_PORT", cls.connect_port),
            pg_port=_int_env(e, "GUARD_PG_PORT", cls.pg_port),
            redis_port=_int_env(e, "GUARD_REDIS_PORT", cls.redis_port),
            mariadb_port=_int_env(e, "GUARD_MARIADB_PORT", cls.mariadb_port),
            mariadb_cdc_password_path=e.get("GUARD_BRANCH2_CDC_PASSWORD_FILE") or "",
        )

    # --- derived locations -------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def m2(self) -> Path:
        """Private Maven local repository, so the stack never depends on (or pollutes) ~/.m2."""
        return self.cache / "m2"

    # --- client-facing endpoints -------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    # --- access (issue 20): TLS, credentials by file path (guard.stack.secrets, guard.stack.tls) --------
    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def ca_file(self) -> Path:
        return self.home / "tls" / "ca.crt"

    @property
    def connect_url(self) -> str:
        return f"http://{self.host}:{self.connect_port}"

    @property
    def branch_dsn(self) -> str:
        """TLS verified against the stack CA; the password comes from the 0600 ``passfile``, not the DSN."""
        return (f"postgresql://{self.app_user}@{self.host}:{self.pg_port}/{self.branch_db}"
                f"?sslmode=verify-full&sslrootcert={self.ca_file}&passfile={self.secrets_dir / 'pgpass'}")

    @property
    def mariadb_dsn(self) -> str:
        """The MariaDB branch's application account (what the workload writes with): TLS verified against the
        stack CA; the password comes from its 0600 file, not the DSN (guard.workload.branch.MariaConnection)."""
        return self.mariadb_dsn_at(self.host, self.mariadb_port)

    def mariadb_dsn_at(self, host: str, port: int) -> str:
        return (f"mysql://{self.mariadb_app_user}@{host}:{port}/{self.mariadb_db}"
                f"?password_file={self.mariadb_app_password_file}&ssl_ca={self.ca_file}")

    @property
    def mariadb_app_password_file(self) -> Path:
        """The application account's password (random, mode 0600, made by the first ``up``)."""
        return self.secrets_dir / "mariadb-app.password"

    @property
    def mariadb_cdc_password_file(self) -> Path:
        """The CDC account's password (random, mode 0600, made by the first ``up``; guard.stack.mariadb);
        ``GUARD_BRANCH2_CDC_PASSWORD_FILE`` overrides the place (docker-compose keeps it on a volume)."""
        return Path(self.mariadb_cdc_password_path) if self.mariadb_cdc_password_path else (
            self.secrets_dir / "mariadb-cdc.password")

    @property
    def mariadb_truststore(self) -> Path:
        """The stack CA as a PKCS#12 truststore, for the MariaDB connector's TLS (guard.stack.mariadb)."""
        return self.secrets_dir / "mariadb-truststore.p12"

    @property
    def mariadb_truststore_properties(self) -> Path:
        """``password=...`` of that truststore, for Connect's FileConfigProvider (0600)."""
        return self.secrets_dir / "connect-mariadb-truststore.properties"

    @property
    def mariadb_connect_cdc_file(self) -> Path:
        """The CDC password as Connect's FileConfigProvider reads it (``password=...``, 0600)."""
        return self.mariadb_cdc_password_file.with_name("connect-mariadb-cdc.properties")

    @property
    def redis_url(self) -> str:
        """The guard's ACL user over TLS; its password is in GUARD_REDIS_PASSWORD_FILE."""
        return (f"rediss://guard@{self.host}:{self.redis_port}/0"
                f"?ssl_ca_certs={self.ca_file}&ssl_cert_reqs=required")

    # --- Kafka security (issue 20, kafka part) ---------------------------------------------------------
    @property
    def internal_port(self) -> int:
        return self.kafka_internal_port or self.kafka_port + 2

    @property
    def internal_bootstrap(self) -> str:
        return f"{self.host}:{self.internal_port}"

    @property
    def tls_dir(self) -> Path:
        """The private CA, the nodes' keystores and the admin client certificate (guard.stack.tls)."""
        return self.home / "tls"

    @property
    def kafka_secrets_dir(self) -> Path:
        return self.home / "secrets"

    def kafka_password_file(self, user: str) -> Path:
        """Where `user`'s Kafka password is kept (0600; guard.stack.kafka_auth)."""
        return self.kafka_secrets_dir / f"kafka-{user}.password"

    def kafka_env(self, user: str = "guard") -> dict[str, str]:
        """How `user` reaches Kafka: protocol, user, password *file* and CA file (never the password)."""
        return {
            "GUARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "GUARD_KAFKA_USERNAME": user,
            "GUARD_KAFKA_PASSWORD_FILE": str(self.kafka_password_file(user)),
            "GUARD_KAFKA_CA_FILE": str(self.tls_dir / "ca.crt"),
        }
    # --- end of Kafka security ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The variables guard components read to find the stack (exactly these keys): where credentials
        are, never their values."""
        return {
            "GUARD_KAFKA_BOOTSTRAP": self.bootstrap,
            "GUARD_CONNECT_URL": self.connect_url,
            "GUARD_CONNECT_CREDENTIALS_FILE": str(self.secrets_dir / "connect-rest.credentials"),
            "GUARD_BRANCH_DSN": self.branch_dsn,
            "GUARD_REDIS_URL": self.redis_url,
            "GUARD_REDIS_PASSWORD_FILE": str(self.secrets_dir / "redis-guard.password"),
            "GUARD_RAW_TOPIC_PREFIX": self.topic_prefix,
            # the second branch (MariaDB): a second worker runs with GUARD_BRANCH / GUARD_RAW_TOPIC_PREFIX /
            # GUARD_GROUP_ID set from these (guard.config.Settings.for_branch); `guard doctor` checks it
            "GUARD_BRANCH2": self.mariadb_branch,
            "GUARD_BRANCH2_DSN": self.mariadb_dsn,
            "GUARD_BRANCH2_RAW_TOPIC_PREFIX": self.mariadb_topic_prefix,
            "GUARD_BRANCH2_CDC_PASSWORD_FILE": str(self.mariadb_cdc_password_file),
            **self.kafka_env(),
        }
    # --- end access (issue 20) ----------------------------------------------------------------------------
