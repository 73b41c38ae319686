"""Kafka broker (``process.roles=broker``, node 1) of a KRaft cluster whose controller is its own process.

Storage is formatted once (the ``meta.properties`` in the log dir is the proof) and kept across
restarts, so topics, offsets and Debezium's Connect state survive ``guard stack down``/``up``.

Crash-aware start (`Broker.start`): after a crash — ``kill()`` recorded the time of death in
``<home>/run/broker.killed``, or the pid file names a process that is gone — a new broker is launched only
once the controller has fenced the dead incarnation, i.e. ``broker.session.timeout.ms`` plus a margin after
the death (or after the controller's own start, if that is later). Started earlier, the new broker could
find its old incarnation still registered and unfenced in the metadata image and act on it (partition
leader, transaction coordinator sending markers) until the controller fenced it; markers sent in the
~1.5 s leaderless window that follows are skipped by Kafka and leave hanging transactions
(`guard.stack.kraft` has the full story).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import BASE_OPTS, classpath, java, logging_opts
from guard.stack.kafka_auth import ensure_tls, mtls_admin_config
from guard.stack.kraft import (
    broker_properties,
    cluster_id,
    fence_wait_seconds,
    format_storage,
    is_combined_layout,
    meta_node_id,
)
from guard.stack.procs import ensure_port_free, pid_alive, progress, quiet_probe_logger, read_pid
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


def broker_answers(client: dict[str, Any], timeout: float = 3.0) -> bool:
    """True when the broker serves metadata (a TCP connect alone says nothing about KRaft readiness).

    `client`: bootstrap and security of the probe (the stack uses its admin certificate on the mutual-TLS
    listener, which answers before any SCRAM user exists; `guard.stack.kafka_auth.mtls_admin_config`).
    """
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {**client, "logger": quiet_probe_logger, "socket.timeout.ms": 3000}
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

    @property
    def killed_file(self) -> Path:
        """Wall-clock time of the last crash `kill()` caused (removed once a new broker was started)."""
        return self.cfg.run / "broker.killed"

    def combined_layout(self) -> bool:
        """True when ``<home>/kafka`` still holds the combined broker+controller node of before stack-18."""
        from guard.stack.controller import Controller

        return is_combined_layout(self.data_dir, Controller(self.cfg).data_dir, self.properties)

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_port_free(self.name, self.cfg.host, self.cfg.internal_port, "GUARD_KAFKA_INTERNAL_PORT")
        ensure_tls(self.cfg)
        write_if_changed(self.properties, broker_properties(self.cfg, self.data_dir))
        template = "log4j.properties" if self.cfg.kafka_version.startswith("3.") else "log4j2.properties"
        write_if_changed(self.log_config, render_asset(template, component="kafka",
                                                       log_file=self.cfg.logs / "kafka-server.log"))
        if meta_node_id(self.data_dir) is None:
            format_storage(self.cfg, self._lib(), self.properties, self.data_dir, self.log_config,
                           self.name, cluster_id(self.dir))

    # --- crash-aware start ---------------------------------------------------------------------
    def crash_record(self) -> tuple[bool, float | None]:
        """(crashed, time of death): from `kill()`'s record, or a pid file naming a dead process (time unknown)."""
        try:
            return True, float(self.killed_file.read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            pass
        pid = read_pid(self.pidfile)
        if pid is not None and not pid_alive(pid, self.marker):
            return True, None
        return False, None

    def _record_death(self) -> None:
        self.cfg.run.mkdir(parents=True, exist_ok=True)
        self.killed_file.write_text(f"{time.time():.3f}\n", encoding="utf-8")

    def wait_until_fenced(self) -> float:
        """Before starting after a crash: sleep until the controller has fenced the dead incarnation."""
        from guard.stack.controller import Controller

        crashed, died_at = self.crash_record()
        if not crashed:
            return 0.0
        wait = fence_wait_seconds(time.time(), died_at, Controller(self.cfg).since(),
                                  self.cfg.broker_session_timeout_ms)
        if wait > 0:
            when = "at an unknown time (pid file of a dead process)" if died_at is None else \
                f"{time.time() - died_at:.1f}s ago"
            progress(f"broker: crashed {when}; waiting {wait:.1f}s until the controller has fenced the dead "
                     f"incarnation (broker.session.timeout.ms={self.cfg.broker_session_timeout_ms} + margin), "
                     f"so the new broker never acts on a stale registration")
            time.sleep(wait)
        return wait

    def start(self) -> bool:
        if self.pid() is None:
            self.wait_until_fenced()
        started = super().start()
        if started:
            self.killed_file.unlink(missing_ok=True)
        return started

    def kill(self) -> None:
        alive = self.pid() is not None
        super().kill()
        if alive:
            self._record_death()

    def stop(self) -> str:
        outcome = super().stop()
        if outcome == "killed after timeout":
            self._record_death()
        return outcome

    @property
    def gc_log(self) -> Path:
        return self.cfg.logs / GC_LOG

    def argv(self) -> list[str]:
        return [java(), f"-Xms{HEAP}", f"-Xmx{HEAP}", *BASE_OPTS, *BROKER_GC_OPTS, *gc_log_opts(self.gc_log),
                f"-Dkafka.logs.dir={self.cfg.logs}",
                *logging_opts(self.cfg.kafka_version, self.log_config), "-cp", classpath(self._lib()),
                "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        return broker_answers(mtls_admin_config(self.cfg))
