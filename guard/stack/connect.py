"""Kafka Connect worker (distributed mode, one worker) with Debezium on its plugin path.

Distributed mode even for one worker: connector configs and source offsets are stored in Kafka
topics, connectors are managed through the REST API exactly as in production, and a second worker
could join the same ``group.id`` to scale out.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import PERF_OPTS, classpath, java, logging_opts
from guard.stack.secrets import CONNECT_REST_USER, StackSecrets
from guard.stack.service import Service

HEAP_MIN, HEAP_MAX = "256m", "768m"
POSTGRES_CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
MARIADB_CONNECTOR_CLASS = "io.debezium.connector.mariadb.MariaDbConnector"


def connect_answers(url: str, required_plugins: tuple[str, ...] = (POSTGRES_CONNECTOR_CLASS, MARIADB_CONNECTOR_CLASS),
                    auth: tuple[str, str] | None = None) -> bool:
    """True once the REST API answers and both Debezium plugins have been loaded."""
    with httpx.Client(base_url=url, timeout=3.0, auth=auth) as http:
        if http.get("/").status_code != 200:
            return False
        plugins = http.get("/connector-plugins").json()
    loaded = {p.get("class") for p in plugins}
    return all(required in loaded for required in required_plugins)


# --- Kafka security of the worker (issue 20, kafka part) ------------------------------------------------
def kafka_security_properties(cfg: StackConfig) -> str:
    """SASL_SSL as the ``connect`` principal for the worker itself and for the producers, consumers and admin
    clients it makes for connectors (Debezium's records and heartbeats go through the worker's producer)."""
    from guard.stack.kafka_auth import java_client_properties

    blocks = [java_client_properties(cfg, "connect", prefix) for prefix in ("", "producer.", "consumer.", "admin.")]
    return "\n# Kafka security: SASL_SSL as User:connect (guard.stack.kafka_auth)\n" + "".join(blocks)
# --- end of Kafka security of the worker ------------------------------------------------------------------


class Connect(Service):
    name = "connect"
    port_env = "GUARD_CONNECT_PORT"
    ready_timeout = 240.0  # plugin scanning + joining the group takes a while on 2 cores

    def __init__(self, cfg: StackConfig, artifacts: Artifacts | None = None) -> None:
        super().__init__(cfg)
        self.artifacts = artifacts
        self.dir = cfg.home / "connect"

    @property
    def port(self) -> int:
        return self.cfg.connect_port

    @property
    def properties(self) -> Path:
        return self.dir / "connect-distributed.properties"

    @property
    def log_config(self) -> Path:
        return self.dir / "log4j2.properties"

    @property
    def marker(self) -> str:
        return str(self.properties)

    def _artifacts(self) -> Artifacts:
        if self.artifacts is None:
            raise StackError("internal: connect started without fetched artifacts")
        return self.artifacts

    def rendered_properties(self) -> str:
        """The worker config `prepare` writes (`guard.stack.orchestrator` compares it with the running one)."""
        a = self._artifacts()
        return render_asset(
            "connect-distributed.properties", connect_version=self.cfg.connect_version,
            bootstrap=self.cfg.bootstrap, host=self.cfg.host, connect_port=self.cfg.connect_port,
            plugin_path=a.plugin_paths, rest_users=self.rest_users) + kafka_security_properties(self.cfg)

    def prepare(self) -> None:
        self.write_rest_users()
        # 0600: the Kafka security block holds the connect principal's password (issue 20)
        write_if_changed(self.properties, self.rendered_properties(), mode=0o600)
        write_if_changed(self.log_config, render_asset("log4j2.properties", component="connect",
                                                       log_file=self.cfg.logs / "connect.log"))

    # --- access (issue 20): REST basic authentication ---------------------------------------------------
    @property
    def rest_users(self) -> Path:
        return self.dir / "rest-users.properties"

    @property
    def rest_jaas(self) -> Path:
        return self.dir / "rest-jaas.conf"

    def write_rest_users(self) -> None:
        """The REST API's users (PropertyFileLoginModule: `user: password`) and the JAAS file naming them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        password = StackSecrets(self.cfg).password("connect-rest")
        write_if_changed(self.rest_users, f"{CONNECT_REST_USER}: {password}\n", 0o600)
        write_if_changed(self.rest_jaas, "KafkaConnect {\n  org.apache.kafka.connect.rest.basic.auth.extension."
                                         f"PropertyFileLoginModule required\n  file=\"{self.rest_users}\";\n}};\n",
                         0o600)

    def secured(self) -> bool:
        """False for a worker configured before issue 20 (REST open to anyone): `up` restarts it."""
        return self.properties.exists() and "rest.extension.classes" in self.properties.read_text(encoding="utf-8")
    # --- end access (issue 20) -----------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [java(), f"-Xms{HEAP_MIN}", f"-Xmx{HEAP_MAX}", *PERF_OPTS, f"-Dkafka.logs.dir={self.cfg.logs}",
                f"-Djava.security.auth.login.config={self.rest_jaas}",
                *logging_opts(self.cfg.connect_version, self.log_config),
                "-cp", classpath(self._artifacts().connect_lib),
                "org.apache.kafka.connect.cli.ConnectDistributed", str(self.properties)]

    def ready(self) -> bool:
        from guard.stack.connector import rest_auth

        return connect_answers(self.cfg.connect_url, auth=rest_auth(self.cfg))
