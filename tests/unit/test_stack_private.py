"""The stack home is closed to other OS users (`guard.stack.procs.private_dirs`, `spawn`'s umask).

The PostgreSQL and MariaDB servers run as their own OS users and get search access up to the stack home.
With 0755 folders and 0644 files they, and every other local user, could read Kafka's segments (the raw CDC
records in clear: `runuser -u postgres -- head …/kafka/data/br0101.public.customers-0/…log` printed ID numbers
and mobiles) and Redis's append-only file. Plain files and processes: nothing of the stack runs here."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from guard.stack.procs import private_dirs, spawn


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_folders_are_the_owners_and_logs_are_reached_by_name_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    kafka, logs, run = home / "kafka", home / "logs", home / "run"
    for d in (kafka / "data", logs, run):
        d.mkdir(parents=True)
        os.chmod(d, 0o755)  # noqa: S103 - the state a home made under umask 022 is in
    (logs / "kafka-server.log").write_text("a record's plaintext in an error message")
    os.chmod(logs / "kafka-server.log", 0o644)  # noqa: S103
    private_dirs(home, traverse=(logs,), private=(kafka, run, home / "redis"))
    assert _mode(home) == 0o711 and _mode(logs) == 0o711
    assert _mode(kafka) == _mode(run) == _mode(home / "redis") == 0o700
    assert _mode(logs / "kafka-server.log") == 0o600


def test_a_service_writes_files_only_its_owner_reads(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a caller's usual umask must not decide what the services' files are
    try:
        out, log = tmp_path / "segment", tmp_path / "logs" / "service.out"
        pid = spawn(["sh", "-c", f"echo plaintext > {out}; echo started"], log_path=log, pidfile=None)
    finally:
        os.umask(old)
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.waitpid(pid, 0)
    assert _mode(out) & 0o077 == 0, oct(_mode(out))
    assert _mode(log) == 0o600, oct(_mode(log))
