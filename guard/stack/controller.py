"""Kafka KRaft controller in its own process (``process.roles=controller``, node 100, the single voter).

Why a separate process: see `guard.stack.kraft`. In short, a crash of the broker no longer restarts the
controller, so the controller's view of the dead broker expires on its own (it fences it after
``broker.session.timeout.ms``) and the broker is started again only after that (`guard.stack.broker`).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import BASE_OPTS, G1_OPTS, classpath, java, logging_opts
from guard.stack.kraft import cluster_id, controller_properties, format_storage, meta_node_id
from guard.stack.procs import pid_alive, read_pid
from guard.stack.service import Service

#: The controller holds the metadata of one broker and a few hundred partitions: 256 MB is plenty.
HEAP = "256m"

#: ApiVersions (api key 18), version 0: every Kafka listener answers it, the controller's included.
_API_VERSIONS = 18


def controller_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when the controller's listener answers a Kafka ApiVersions request with error code 0.

    librdkafka cannot talk to a controller listener, so this speaks the protocol directly: request header v1
    (api key, version 0, correlation id, client id) and the response's correlation id and error code.
    """
    client = b"guard-stack"
    body = struct.pack(">hhih", _API_VERSIONS, 0, 7, len(client)) + client
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(struct.pack(">i", len(body)) + body)
        head = _recv_exact(s, 4)
        size = struct.unpack(">i", head)[0]
        resp = _recv_exact(s, min(size, 64))
    correlation, error = struct.unpack(">ih", resp[:6])
    return correlation == 7 and error == 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("controller closed the connection")
        buf += chunk
    return buf


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
        write_if_changed(self.properties, controller_properties(self.cfg, self.data_dir))
        template = "log4j.properties" if self.cfg.kafka_version.startswith("3.") else "log4j2.properties"
        write_if_changed(self.log_config, render_asset(template, component="kafka-controller",
                                                       log_file=self.cfg.logs / "kafka-controller.log"))
        if meta_node_id(self.data_dir) is None:
            format_storage(self.cfg, self._lib(), self.properties, self.data_dir, self.log_config,
                           self.name, cluster_id(self.dir))

    def argv(self) -> list[str]:
        return [java(), f"-Xms{HEAP}", f"-Xmx{HEAP}", *BASE_OPTS, *G1_OPTS, f"-Dkafka.logs.dir={self.cfg.logs}",
                *logging_opts(self.cfg.kafka_version, self.log_config), "-cp", classpath(self._lib()),
                "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        return controller_answers(self.cfg.host, self.cfg.controller_port)

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
