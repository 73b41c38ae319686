"""Alerts deduplicated across workers (`RedisKeyStore.alert_once`) are asked for once per key and hour by a
process (`guard.records.builders.RememberedOnce`), not once per event that meets the rule."""

from __future__ import annotations

from guard.records.builders import RememberedOnce


class SharedOnce:
    """The key store's SET NX with a TTL: True for the first caller of a key within `ttl_s`."""

    def __init__(self, clock: list[float], ttl_s: float = 86_400.0) -> None:
        self.clock, self.ttl_s, self.calls, self._until = clock, ttl_s, [], {}

    def __call__(self, key: str) -> bool:
        self.calls.append(key)
        if self._until.get(key, -1.0) > self.clock[0]:
            return False
        self._until[key] = self.clock[0] + self.ttl_s
        return True


def test_a_rule_met_by_every_event_asks_the_key_store_once_per_key_and_hour() -> None:
    clock = [1_000.0]
    shared = SharedOnce(clock)
    once = RememberedOnce(shared, clock=lambda: clock[0])
    answers = [once("drift:public.t:note") for _ in range(1_000)]
    assert answers == [True] + [False] * 999
    assert shared.calls == ["drift:public.t:note"], "one round trip for a thousand events"
    assert once("drift:public.t:other") is True and len(shared.calls) == 2, "another key is asked"
    clock[0] += 3_600.5  # the hour is up: asked again, and the shared TTL still says no
    assert once("drift:public.t:note") is False and len(shared.calls) == 3
    clock[0] += 86_400.0  # past the shared TTL: the alert comes again
    assert once("drift:public.t:note") is True


def test_another_worker_that_alerted_first_is_respected_and_the_memo_is_bounded() -> None:
    clock = [0.0]
    shared = SharedOnce(clock)
    assert shared("no_subject:0101:public.t") is True  # another worker alerted
    once = RememberedOnce(shared, clock=lambda: clock[0], limit=3)
    assert once("no_subject:0101:public.t") is False
    for n in range(5):
        once(f"k{n}")
    assert len(once._answered) <= 3
