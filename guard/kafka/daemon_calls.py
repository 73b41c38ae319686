"""Kafka client calls on a daemon helper thread: a call that never returns blocks neither the worker nor its exit.

The worker runs its transactional calls (`send_offsets_to_transaction`, `commit_transaction`, ...) and its
consumer's `close()` on a helper thread so that it can give up on them at a deadline (`SanitizerWorker._txn`).
After a broker restart librdkafka's transactional calls can block far beyond their own timeout: a
`send_offsets_to_transaction(timeout=10)` on a producer the worker had replaced was still blocked minutes later.

`concurrent.futures.ThreadPoolExecutor` is the wrong helper for such calls. Its threads are joined when the
interpreter exits (the module registers an exit hook that waits for every worker thread it ever started, also
after `shutdown(wait=False)`), so a worker that had given up on one stuck call could not exit: stopped with
SIGTERM after a broker outage, it checkpointed, printed its stats, and then hung until it was killed
(`test_broker_restarted_and_killed_while_the_guard_and_debezium_run`, docs/reliability.md). `DaemonExecutor`
is the same single-thread executor on a daemon thread, which the exit does not wait for: what a stuck call was
doing ends with the process, as it would with SIGKILL, which the exactly-once design already survives.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonExecutor(Executor):
    """Runs submitted calls one at a time, in order, on one daemon thread named `name`.

    `shutdown(wait=False)` lets the calls already submitted finish on the thread and returns at once; the thread
    ends after them. Nothing joins the thread at exit.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=_serve, args=(self._calls,), name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit a call after shutdown")
            future: Future[T] = Future()
            self._calls.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(None)
        if wait:
            self._thread.join()


def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
    """The helper thread: run each call and settle its future, until the shutdown marker."""
    while True:
        item = calls.get()
        if item is None:
            return
        future, fn, args, kwargs = item
        # Drop this thread's references before the next wait: a client whose call is done can then be destroyed
        # wherever its last reference goes (`guard.kafka.abandoned`), not at this thread's next call.
        del item
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            else:
                future.set_result(result)
        del future, fn, args, kwargs
