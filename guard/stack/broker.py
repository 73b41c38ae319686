"""Kafka broker: single node, KRaft (combined broker + controller), jars from the Maven cache.

Storage is formatted once (the ``meta.properties`` in the log dir is the proof) and kept across
restarts, so topics, offsets and Debezium's Connect state survive ``guard stack down``/``up``.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any

from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import BASE_OPTS, classpath, java, logging_opts
from guard.stack.procs import progress, tail
from guard.stack.service import Service

#: Kafka's own default (`kafka-server-start.sh`). At 512m the broker's young generation filled about once a
#: second under the bench's load and G1 paused it 10-120 ms each time; at 1g it collected about half as
#: often. With ZGC (below) 1g gives a concurrent cycle every ~10 s under that load, with no allocation stall.
HEAP = "1g"


#: The broker's collector: ZGC, which marks and moves objects while the broker runs, instead of Kafka's
#: default G1, whose young collections stop it. On 2 cores shared with the guard and the bench, G1's
#: pauses took 20-126 ms (the collector's threads waiting for a core), 4-22 of them in a 20-s latency
#: phase, and every one stalled each produce, fetch and commit; the guard, busier per event than a plain
#: loop, then needs longer to catch up, so one 100-ms pause cost it ~250 ms (docs/benchmark.md, rounds
#: 7 and 8). ZGC's pauses are well under a millisecond; its marking runs on a core like any other thread.
BROKER_GC_OPTS = ["-XX:+UseZGC"]

#: The broker's GC log, in the stack's log directory (`Broker.gc_log`).
GC_LOG = "kafka-gc.log"


def gc_log_opts(path: Path) -> list[str]:
    """The broker's GC log at `path`, rotated (3 x 10 MB), as `kafka-server-start.sh` writes it.

    `gc+phases` adds the pause lines of a concurrent collector (ZGC's `Pause Mark Start` and the like),
    and G1's per-phase times if it is ever put back. With the log always on, a latency spike can be
    matched to the broker's pauses afterwards, without restarting the broker to find out.
    """
    return [f"-Xlog:gc,gc+phases:file={path}:time,uptime:filecount=3,filesize=10M"]


_quiet = logging.getLogger("guard.stack.kafka-probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def new_cluster_id() -> str:
    """Same format as ``kafka-storage random-uuid`` (url-safe base64 of 16 bytes), without a JVM start."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when the broker serves metadata (a TCP connect alone says nothing about KRaft readiness)."""
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _quiet, "socket.timeout.ms": 3000}
    admin = AdminClient(conf)
    md = admin.list_topics(timeout=timeout)
    return bool(md.brokers)


class Broker(Service):
    name = "broker"
    port_env = "GUARD_KAFKA_PORT"
    ready_timeout = 120.0

    def __init__(self, cfg: StackConfig, artifacts: Artifacts | None = None) -> None:
        super().__init__(cfg)
        self.artifacts = artifacts
        self.dir = cfg.home / "kafka"

    @property
    def port(self) -> int:
        return self.cfg.kafka_port

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log_config(self) -> Path:
        legacy = self.cfg.kafka_version.startswith("3.")
        return self.dir / ("log4j.properties" if legacy else "log4j2.properties")

    @property
    def marker(self) -> str:
        return str(self.properties)

    def _lib(self) -> Path:
        if self.artifacts is None:
            raise StackError("internal: broker started without fetched artifacts")
        return self.artifacts.broker_lib

    def prepare(self) -> None:
        from guard.stack.procs import ensure_port_free

        ensure_port_free("broker (controller listener)", self.cfg.host, self.cfg.controller_port,
                         "GUARD_CONTROLLER_PORT")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_if_changed(self.properties, render_asset(
            "server.properties", kafka_version=self.cfg.kafka_version, host=self.cfg.host,
            kafka_port=self.cfg.kafka_port, controller_port=self.cfg.controller_port, data_dir=self.data_dir))
        template = "log4j.properties" if self.cfg.kafka_version.startswith("3.") else "log4j2.properties"
        write_if_changed(self.log_config, render_asset(template, component="kafka",
                                                       log_file=self.cfg.logs / "kafka-server.log"))
        self._format_once()

    def _format_once(self) -> None:
        """Format KRaft storage on first start only; an existing meta.properties means keep the data."""
        if (self.data_dir / "meta.properties").exists():
            return
        id_file = self.dir / "cluster.id"
        if not id_file.exists():
            id_file.write_text(new_cluster_id() + "\n", encoding="utf-8")
        cluster_id = id_file.read_text(encoding="utf-8").strip()
        progress(f"broker: formatting KRaft storage in {self.data_dir} (cluster {cluster_id})")
        log = self.cfg.logs / "kafka-format.log"
        with open(log, "ab") as out:
            rc = subprocess.run(
                [java(), *logging_opts(self.cfg.kafka_version, self.log_config),
                 "-cp", classpath(self._lib()), "kafka.tools.StorageTool", "format",
                 "-t", cluster_id, "-c", str(self.properties), "--ignore-formatted"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
        if rc != 0:
            raise StackError(f"broker: formatting storage failed (exit {rc}).\n{tail(log)}\n"
                             f"If {self.data_dir} holds data from another Kafka version, run "
                             f"`guard stack down` and remove it.")

    @property
    def gc_log(self) -> Path:
        return self.cfg.logs / GC_LOG

    def argv(self) -> list[str]:
        return [java(), f"-Xms{HEAP}", f"-Xmx{HEAP}", *BASE_OPTS, *BROKER_GC_OPTS, *gc_log_opts(self.gc_log),
                f"-Dkafka.logs.dir={self.cfg.logs}",
                *logging_opts(self.cfg.kafka_version, self.log_config), "-cp", classpath(self._lib()),
                "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        return broker_answers(self.cfg.bootstrap)
