"""Clients set aside by the worker: a few kept, older ones destroyed on a thread of their own."""

from __future__ import annotations

import threading
import time

import pytest

from guard.kafka.abandoned import SetAside


class Client:
    """Records on which thread it was destroyed (librdkafka's destroy runs in a client's dealloc)."""

    destroyed: dict[int, str] = {}

    def __init__(self, n: int) -> None:
        self.n = n

    def __del__(self) -> None:
        Client.destroyed[self.n] = threading.current_thread().name


def test_the_oldest_clients_beyond_the_kept_ones_are_destroyed_off_the_callers_thread():
    Client.destroyed.clear()
    aside = SetAside(keep=4)
    for n in range(6):
        aside.add(Client(n))
    deadline = time.monotonic() + 10
    while len(Client.destroyed) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Client.destroyed == {0: "bg-release", 1: "bg-release"}
    assert len(aside) == 4 and aside.released == 2


def test_nothing_is_released_up_to_the_kept_count():
    Client.destroyed.clear()
    aside = SetAside(keep=4)
    held = [Client(n) for n in range(4)]
    for client in held:
        aside.add(client)
    del client, held
    assert len(aside) == 4 and aside.released == 0 and Client.destroyed == {}
    with pytest.raises(ValueError):
        SetAside(keep=-1)
