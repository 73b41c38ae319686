"""The helper executor of the worker's Kafka calls (`guard.kafka.daemon_calls`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from guard.kafka.daemon_calls import DaemonExecutor

#: A process that hands its helper a call that never returns (as librdkafka's transactional calls can block
#: after a broker restart), says so, and ends its main thread.
_STUCK_CALL = textwrap.dedent("""
    import sys, threading
    {setup}
    pool.submit(threading.Event().wait)
    pool.shutdown(wait=False)
    print("main thread done", flush=True)
""")


def _run_stuck(setup: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _STUCK_CALL.format(setup=setup)], stdout=subprocess.PIPE,
                            text=True)


def test_a_call_that_never_returns_does_not_hold_the_process_at_exit():
    proc = _run_stuck("from guard.kafka.daemon_calls import DaemonExecutor\npool = DaemonExecutor('bg-test')")
    out, _ = proc.communicate(timeout=120)  # a bound for a hang, not a measurement: it exits at once
    assert proc.returncode == 0
    assert out == "main thread done\n"


def test_the_thread_pool_it_replaces_does_hold_the_process():
    """Why the worker does not use ThreadPoolExecutor: the interpreter's exit joins its threads."""
    proc = _run_stuck("from concurrent.futures import ThreadPoolExecutor\npool = ThreadPoolExecutor(1)")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "main thread done\n"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # it never exits on its own: any wait times out
    finally:
        proc.kill()
        proc.communicate()


def test_calls_run_in_order_and_hand_back_results_and_errors():
    pool = DaemonExecutor("bg-test")
    seen: list[int] = []
    futures = [pool.submit(seen.append, n) for n in range(50)]
    failing = pool.submit(int, "not a number")
    assert pool.submit(lambda a, *, b: a + b, 2, b=3).result(timeout=30) == 5
    assert [f.result(timeout=30) for f in futures] == [None] * 50
    assert seen == list(range(50))
    with pytest.raises(ValueError, match="not a number"):
        failing.result(timeout=30)
    pool.shutdown()


def test_calls_submitted_before_a_shutdown_still_run_and_none_after_it():
    pool = DaemonExecutor("bg-test")
    gate = threading.Event()
    blocked = pool.submit(gate.wait)
    queued = pool.submit(lambda: "ran")
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)
    gate.set()
    assert blocked.result(timeout=30) is True
    assert queued.result(timeout=30) == "ran"
    pool.shutdown(wait=True)  # the thread ends after the queued calls


def test_a_cancelled_call_does_not_run():
    pool = DaemonExecutor("bg-test")
    gate = threading.Event()
    pool.submit(gate.wait)
    ran: list[str] = []
    cancelled = pool.submit(ran.append, "x")
    assert cancelled.cancel()
    gate.set()
    pool.shutdown(wait=True)
    assert ran == [] and cancelled.cancelled()


def test_the_helper_thread_is_a_daemon_with_its_name():
    pool = DaemonExecutor("bg-txn")
    name, daemon = pool.submit(lambda: (threading.current_thread().name,
                                        threading.current_thread().daemon)).result(timeout=30)
    pool.shutdown()
    assert (name, daemon) == ("bg-txn", True)
