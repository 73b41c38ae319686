"""Kafka KRaft controller in its own process (``process.roles=controller``, node 100, the single voter).

Why a separate process: see `guard.stack.kraft`. In short, a crash of the broker no longer restarts the
controller, so the controller's view of the dead broker expires on its own (it fences it after
``broker.session.timeout.ms``) and the broker is started again only after that (`guard.stack.broker`).
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

from guard.kafka_security import api_versions_answered
from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import BASE_OPTS, G1_OPTS, classpath, java, logging_opts
from guard.stack.kafka_auth import ensure_tls, scram_format_args
from guard.stack.kraft import cluster_id, controller_properties, format_storage, meta_node_id
from guard.stack.procs import pid_alive, read_pid
from guard.stack.service import Service

#: The controller holds the metadata of one broker and a few hundred partitions: 256 MB is plenty.
HEAP = "256m"

def admin_tls_context(cfg: StackConfig) -> ssl.SSLContext:
    """TLS as the stack's admin (client certificate CN=admin), trusting only the stack's CA."""
    from guard.stack.kafka_auth import local_ca

    ca = local_ca(cfg)
    ctx = ssl.create_default_context(cafile=str(ca.ca_cert))
    ctx.load_cert_chain(str(ca.cert("admin")), str(ca.key("admin")))
    return ctx


def controller_answers(cfg: StackConfig, timeout: float = 3.0) -> bool:
    """True when the controller's mutual-TLS listener answers ApiVersions."""
    return api_versions_answered(cfg.host, cfg.controller_port, timeout, admin_tls_context(cfg))


class Controller(Service):
    name = "controller"
    port_env = "GUARD_CONTROLLER_PORT"
    ready_timeout = 90.0

    def __init__(self, cfg: StackConfig, artifacts: Artifacts | None = None) -> None:
        super().__init__(cfg)
        self.artifacts = artifacts
        self.dir = cfg.home / "kafka"

    @property
    def port(self) -> int:
        return self.cfg.controller_port

    @property
    def data_dir(self) -> Path:
        return self.dir / "controller"

    @property
    def properties(self) -> Path:
        return self.dir / "controller.properties"

    @property
    def log_config(self) -> Path:
        legacy = self.cfg.kafka_version.startswith("3.")
        return self.dir / ("controller-log4j.properties" if legacy else "controller-log4j2.properties")

    @property
    def ready_file(self) -> Path:
        """Wall-clock time at which this controller last became ready (see `since`)."""
        return self.cfg.run / "controller.ready"

    @property
    def marker(self) -> str:
        return str(self.properties)

    def _lib(self) -> Path:
        if self.artifacts is None:
            raise StackError("internal: controller started without fetched artifacts")
        return self.artifacts.broker_lib

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_tls(self.cfg)
        write_if_changed(self.properties, controller_properties(self.cfg, self.data_dir))
        template = "log4j.properties" if self.cfg.kafka_version.startswith("3.") else "log4j2.properties"
        write_if_changed(self.log_config, render_asset(template, component="kafka-controller",
                                                       log_file=self.cfg.logs / "kafka-controller.log"))
        if meta_node_id(self.data_dir) is None:
            format_storage(self.cfg, self._lib(), self.properties, self.data_dir, self.log_config,
                           self.name, cluster_id(self.dir), scram_format_args(self.cfg))

    def argv(self) -> list[str]:
        return [java(), f"-Xms{HEAP}", f"-Xmx{HEAP}", *BASE_OPTS, *G1_OPTS, f"-Dkafka.logs.dir={self.cfg.logs}",
                *logging_opts(self.cfg.kafka_version, self.log_config), "-cp", classpath(self._lib()),
                "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        return controller_answers(self.cfg)

    def wait_ready(self) -> None:
        super().wait_ready()
        self.ready_file.write_text(f"{time.time():.3f}\n", encoding="utf-8")

    def since(self) -> float | None:
        """Wall-clock time since which the running controller has served (None when it does not run).

        The later of its process start and its last recorded readiness: a controller that started after a
        broker died gives the dead broker's registration a fresh session when it replays its log.
        """
        pid = read_pid(self.pidfile)
        if pid is None or not pid_alive(pid, self.marker):
            return None
        import psutil

        started = psutil.Process(pid).create_time()
        try:
            ready = float(self.ready_file.read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            ready = started
        return max(started, ready)
