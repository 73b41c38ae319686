"""What the local stack's processes and the whole machine spend per event of a measured window.

A worker's own CPU per event (`ThroughputResult.cpu_us_per_event`) is not what bounds its rate on a small
machine: the broker that takes its records and the key store that answers its scripts run on the same
cores. On 2 cores the rates of the plain loop and the guard are each about what the machine's busy cores
allow for that mode's *total* CPU per event (docs/benchmark.md, round 20), so the bench reports that total
and its parts: the broker (with its KRaft controller), Kafka Connect, the key store (Redis), and every
process together (from `/proc/stat`, so the bench's own pacer and anything else running count too).

Only the processes of `guard stack up` are sampled, and only when the bench runs against that stack
(`local_stack_processes`); against another broker the figures are absent, never guessed.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil

from guard.stack.broker import Broker
from guard.stack.config import StackConfig
from guard.stack.connect import Connect
from guard.stack.controller import Controller
from guard.stack.redisd import Redis

#: Sampling period (s). A window of a few seconds is bounded by interpolating between the samples around
#: its ends, so the period sets the resolution, not a bias.
INTERVAL_S = 0.25


def local_stack_processes(bootstrap: str, redis_url: str) -> dict[str, int]:
    """PIDs of the local stack's processes the bench's records pass through: {"broker": …, "controller": …,
    "connect": …, "key store": …}; only those running, and none when the bench's broker isn't the stack's.

    The key store counts only if `redis_url` names the stack's Redis (same port), so a bench pointed at
    another Redis doesn't charge the local one's idle CPU to the guard.
    """
    cfg = StackConfig.from_env()
    if bootstrap != cfg.bootstrap:
        return {}
    found: dict[str, int] = {}
    services = {"broker": Broker(cfg), "controller": Controller(cfg), "connect": Connect(cfg)}
    if names_stack_redis(redis_url, cfg.host, cfg.redis_port):
        services["key store"] = Redis(cfg)
    for name, service in services.items():
        pid = service.pid()
        if pid is not None:
            found[name] = pid
    return found


def names_stack_redis(redis_url: str, host: str, port: int) -> bool:
    """Whether `redis_url` is the stack's Redis: its host and port, not merely the same port elsewhere."""
    parsed = urlsplit(redis_url)
    return parsed.hostname == host and (parsed.port or 6379) == port


@dataclass(frozen=True)
class Sample:
    """One reading: epoch seconds, each process's CPU seconds (user + system, all threads), and the
    machine's busy and total CPU seconds over all cores."""

    t: float
    cpu: dict[str, float]
    busy: float
    total: float


@dataclass(frozen=True)
class WindowCpu:
    """CPU seconds spent in a window: per stack process, and by the whole machine (busy of total)."""

    seconds: float
    processes: dict[str, float]
    busy: float
    total: float

    def per_event(self, events: int) -> dict[str, float]:
        """µs per event of each process and of the whole machine (`machine`), and the machine's busy share."""
        per = max(events, 1)
        out = {name: round(cpu / per * 1e6, 2) for name, cpu in self.processes.items()}
        out["machine"] = round(self.busy / per * 1e6, 2)
        out["machine_busy_share"] = round(self.busy / self.total, 3) if self.total > 0 else 0.0
        return out


class StackCpuSampler:
    """Reads the CPU times of the given processes and of the machine every `interval` s in a daemon thread."""

    def __init__(self, processes: dict[str, int], interval: float = INTERVAL_S) -> None:
        self.samples: list[Sample] = []
        self._procs: dict[str, psutil.Process] = {}
        for name, pid in processes.items():
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.Error:  # stopped since its pid file was read: no figure for it
                continue
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="stack-cpu-sampler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            sample = self._read()
            with self._lock:
                self.samples.append(sample)
            if self._stop.wait(self._interval):
                return

    def _read(self) -> Sample:
        cpu: dict[str, float] = {}
        for name, proc in self._procs.items():
            try:
                times = proc.cpu_times()
            except psutil.Error:  # stopped (a crash test, `guard stack down`): absent from the windows after
                continue
            cpu[name] = times.user + times.system
        machine = psutil.cpu_times()
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        # Linux counts a guest's time in `user` and `nice` as well as in `guest` and `guest_nice`.
        total = sum(machine) - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
        return Sample(time.time(), cpu, total - idle, total)

    def window(self, start: float, end: float) -> WindowCpu | None:
        """CPU spent from `start` to `end` (epoch s), each end interpolated between the samples around it;
        None if the samples don't cover the window or a process was not readable at both ends. A window
        that ended a moment ago waits for the next sample (a few intervals at most)."""
        deadline = time.monotonic() + 4 * self._interval + 1
        while True:
            with self._lock:
                samples = list(self.samples)
            if (samples and samples[-1].t >= end) or time.monotonic() > deadline or not self._thread.is_alive():
                return cpu_in_window(samples, start, end)
            time.sleep(self._interval / 4)


def cpu_in_window(samples: list[Sample], start: float, end: float) -> WindowCpu | None:
    """`StackCpuSampler.window` on a list of samples in time order (pure: unit-tested)."""
    if end <= start or len(samples) < 2 or samples[0].t > start or samples[-1].t < end:
        return None
    a, b = _at(samples, start), _at(samples, end)
    if a is None or b is None:
        return None
    names = a.cpu.keys() & b.cpu.keys()
    return WindowCpu(end - start, {name: max(0.0, b.cpu[name] - a.cpu[name]) for name in sorted(names)},
                     max(0.0, b.busy - a.busy), max(0.0, b.total - a.total))


def _at(samples: list[Sample], t: float) -> Sample | None:
    """The readings at time `t`, interpolated linearly between the samples before and after it."""
    times = [s.t for s in samples]
    i = bisect.bisect_left(times, t)
    if i < len(samples) and samples[i].t == t:
        return samples[i]
    if i == 0 or i == len(samples):
        return None
    lo, hi = samples[i - 1], samples[i]
    f = (t - lo.t) / (hi.t - lo.t)
    names = lo.cpu.keys() & hi.cpu.keys()
    return Sample(t, {n: lo.cpu[n] + f * (hi.cpu[n] - lo.cpu[n]) for n in names},
                  lo.busy + f * (hi.busy - lo.busy), lo.total + f * (hi.total - lo.total))
