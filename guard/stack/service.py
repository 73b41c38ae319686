"""The lifecycle every local service shares: start once, wait until it really answers, stop, kill.

Each concrete service (broker, connect, postgres, redis) only says how to prepare its files, which
command to run, and how to probe readiness; idempotency, port checks, pid bookkeeping and the
graceful-then-forceful stop live here once.
"""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from guard.stack.config import StackConfig
from guard.stack.procs import (
    ensure_port_free,
    pid_alive,
    port_in_use,
    port_owner,
    progress,
    read_pid,
    signal_and_wait,
    spawn,
    stop_pid,
    wait_until,
)


@dataclass(frozen=True)
class ServiceStatus:
    """What ``guard stack status`` shows for one service."""

    name: str
    running: bool
    detail: str


class Service(ABC):
    """One long-running local process managed through a pid file under ``<home>/run``."""

    name: str = ""
    port_env: str = ""
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 30.0
    ready_timeout: float = 60.0

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg

    # --- what subclasses describe --------------------------------------------------------------
    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    @abstractmethod
    def marker(self) -> str:
        """A string unique to this stack home that appears in the process's command line."""

    @abstractmethod
    def prepare(self) -> None:
        """Create directories and config files (idempotent); called before every start."""

    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def ready(self) -> bool:
        """True when the service answers a real request (not just an open port)."""

    def spawn_env(self) -> dict[str, str]:
        return {}

    # --- shared lifecycle --------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.cfg.logs / f"{self.name}.out"

    @property
    def pidfile(self) -> Path:
        return self.cfg.run / f"{self.name}.pid"

    def pid(self) -> int | None:
        """Pid of our running process, or None (stale pid files and reused pids are ignored)."""
        pid = read_pid(self.pidfile)
        if pid is not None and pid_alive(pid, self.marker):
            return pid
        return None

    def start(self) -> bool:
        """Start unless already running; returns True if a new process was spawned."""
        pid = self.pid()
        if pid is not None:
            progress(f"{self.name}: already running (pid {pid}, {self.cfg.host}:{self.port})")
            return False
        ensure_port_free(self.name, self.cfg.host, self.port, self.port_env)
        self.prepare()
        pid = spawn(self.argv(), log_path=self.log_path, pidfile=self.pidfile, env=self.spawn_env(),
                    cwd=self.cfg.home)
        progress(f"{self.name}: started pid {pid}, log {self.log_path}")
        return True

    def wait_ready(self) -> None:
        t = wait_until(self.ready, what=self.name, timeout=self.ready_timeout, log_path=self.log_path,
                       alive=self._alive)
        progress(f"{self.name}: ready ({t:.1f}s)")

    def _alive(self) -> bool:
        """During startup: our process, or the process we spawned (its marker may not show yet)."""
        if self.pid() is not None:
            return True
        spawned = read_pid(self.pidfile)
        return spawned is not None and pid_alive(spawned)

    def stop(self) -> str:
        """Graceful stop (service-specific signal, wait, then SIGKILL). Data is kept."""
        pid = self.pid()
        if pid is None:
            return "not running"
        outcome = stop_pid(pid, sig=self.stop_signal, timeout=self.stop_timeout)
        self.pidfile.unlink(missing_ok=True)
        return outcome

    def kill(self) -> None:
        """SIGKILL the service's whole process group (crash simulation for reliability tests)."""
        pid = self.pid()
        if pid is None:
            return
        signal_and_wait(pid, signal.SIGKILL, 15.0, group=True)
        # let the kernel release the listening socket before a quick restart
        time.sleep(0.2)

    def status(self) -> ServiceStatus:
        pid = self.pid()
        where = f"{self.cfg.host}:{self.port}"
        if pid is not None:
            try:
                ok = self.ready()
            except Exception:
                ok = False
            suffix = "" if ok else ", not answering yet"
            return ServiceStatus(self.name, True, f"pid {pid}, {where}{suffix}")
        if port_in_use(self.cfg.host, self.port):
            return ServiceStatus(self.name, False, f"stopped; {where} is taken by {port_owner(self.port)}")
        return ServiceStatus(self.name, False, f"stopped ({where})")
