"""Process plumbing shared by every service: detached spawn, pid files, signals, ports, waiting.

Services are started with ``start_new_session=True`` so they survive the CLI that started them and a
Ctrl-C in the terminal; their stdout/stderr go to a file under ``<home>/logs``. A pid file alone is
not trusted (pids get reused): a pid counts as ours only if the live process's command line contains
a marker unique to this stack home (usually the path of its config file).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from guard.stack.errors import StackError

#: The logger given to the stack's Kafka clients that probe a service (is the broker up, is an anonymous login
#: refused): their connection errors while a service starts or refuses are the answer, not news.
quiet_probe_logger = logging.getLogger("guard.stack.kafka-probe")
quiet_probe_logger.addHandler(logging.NullHandler())
quiet_probe_logger.propagate = False


def progress(msg: str) -> None:
    """One progress line for humans (the CLI and ``python -m guard.stack`` both print these)."""
    print(f"[stack] {msg}", flush=True)


def _reap(pid: int) -> None:
    """Collect a child that already exited so it does not linger as a zombie in long test runs."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, marker: str | None = None) -> bool:
    """True if ``pid`` runs, is not a zombie, and (if given) has ``marker`` in its command line."""
    _reap(pid)
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if marker is None:
            return True
        return marker in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def read_pid(pidfile: Path) -> int | None:
    """The first integer in ``pidfile`` (our own files and PostgreSQL's postmaster.pid alike)."""
    try:
        first = pidfile.read_text(encoding="utf-8").split()[0]
        return int(first)
    except (OSError, ValueError, IndexError):
        return None


#: The only variables a service inherits from whoever runs `guard stack`: what a process needs to run at all.
#: Everything else (GUARD_MASTER_KEY, GUARD_PG_ADMIN_DSN, PGPASSWORD, REDISCLI_AUTH, cloud credentials, ...)
#: stays out of the broker's, Connect's, PostgreSQL's and Redis's environment; each service adds what it
#: needs itself (`Service.spawn_env`) and reads its secrets from files named in its own configuration.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "JAVA_HOME")


#: The umask services start with: no access for group and others to anything they create.
SERVICE_UMASK = 0o077


def private_dirs(home: Path, *, traverse: tuple[Path, ...] = (), private: tuple[Path, ...] = ()) -> None:
    """Close the stack home to other OS users: `private` directories 0700 (their files are root's alone),
    `traverse` ones and the home 0711 (the database servers' OS users reach their own folders and files
    through them, by name, without listing them), and the root-owned files directly in `traverse` 0600.

    The PostgreSQL and MariaDB servers run as their own OS users and are granted search access up to the
    home; with 0755 folders and 0644 files they (and every other local user) could read Kafka's segments,
    which hold the raw CDC records in clear, and Redis's append-only file."""
    for d in (home, *traverse):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)  # noqa: S103 - search only: the servers' users reach their own files by name
    for d in private:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    for d in traverse:
        for f in d.iterdir():
            st = f.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(f, 0o600)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service: INHERITED_ENV from ours plus ``extra``, nothing else."""
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV}
    env.update(extra or {})
    return env


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    pidfile: Path | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` detached (own session), stdout+stderr appended to ``log_path``; return its pid.

    The service runs with umask 077 (`SERVICE_UMASK`): what it writes (Kafka's segments with raw CDC
    records, Redis's append-only file with wrapped keys, its logs) is its owner's alone, whatever the
    caller's umask. The log file is opened here with the same mode."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = child_env(env)
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {argv[0]} =====\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
                close_fds=True,
                umask=SERVICE_UMASK,
            )
        except FileNotFoundError as exc:
            raise StackError(f"cannot run {argv[0]!r}: {exc}. Run scripts/setup.sh to install it.") from exc
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{proc.pid}\n", encoding="utf-8")
    return proc.pid


def signal_and_wait(pid: int, sig: int, timeout: float, *, group: bool = False) -> bool:
    """Send ``sig`` (to the process group if ``group``), wait up to ``timeout``; True if it exited."""
    try:
        if group:
            os.killpg(os.getpgid(pid), sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return not pid_alive(pid)


def stop_pid(pid: int, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> str:
    """Graceful stop: ``sig``, wait, then SIGKILL the whole process group. Returns how it ended."""
    if signal_and_wait(pid, sig, timeout):
        return "stopped"
    signal_and_wait(pid, signal.SIGKILL, 10.0, group=True)
    return "killed after timeout"


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on ``host:port`` (bind test: catches 0.0.0.0 listeners too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_owner(port: int) -> str:
    """Best-effort description of who listens on ``port`` ("pid 123 (java)"), for error messages."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    name = psutil.Process(c.pid).name()
                except psutil.Error:
                    name = "?"
                return f"pid {c.pid} ({name})"
    except (psutil.AccessDenied, OSError):
        pass
    return "an unknown process"


def ensure_port_free(service: str, host: str, port: int, env_var: str) -> None:
    """Raise a StackError that says who holds the port and how to pick another one."""
    if port_in_use(host, port):
        raise StackError(
            f"{service}: port {host}:{port} is already taken by {port_owner(port)}, which is not part of "
            f"this stack. Stop that process, or choose another port with {env_var}=<port>."
        )


def tail(path: Path, lines: int = 15) -> str:
    """Last lines of a log file, for error messages (empty if the file does not exist)."""
    try:
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log_path: Path | None = None,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.5,
) -> float:
    """Poll ``check`` until true; fail fast if ``alive`` says the process died. Returns seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # noqa: S110 - readiness probes fail in many ways until the service is up
            pass
        hint = f"\n--- last lines of {log_path} ---\n{tail(log_path)}" if log_path else ""
        if alive is not None and not alive():
            raise StackError(f"{what}: the process exited during startup. See {log_path}.{hint}")
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not ready after {timeout:.0f}s. See {log_path}.{hint}")
        time.sleep(interval)
