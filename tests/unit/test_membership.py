"""The membership watch: how long a consumer may go without a member id before the worker rebuilds it."""

from __future__ import annotations

import pytest

from guard.kafka.membership import CHECK_EVERY_S, SESSIONS_WITHOUT_MEMBER_ID, MembershipWatch, subscription_matches


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_consumer_that_never_joins_is_stuck_after_the_limit_counted_from_its_subscription():
    clock = Clock()
    watch = MembershipWatch(60.0, clock)
    clock.now += 59.0
    assert watch.stuck(None) is None
    clock.now += 1.0
    assert watch.stuck(None) == pytest.approx(60.0)


def test_a_member_resets_the_count_and_a_lost_session_starts_it_again():
    clock = Clock()
    watch = MembershipWatch(60.0, clock)
    clock.now += 50.0
    assert watch.stuck("rdkafka-1") is None
    clock.now += 30.0
    assert watch.stuck("") is None  # out of the group since now: librdkafka's empty id after SESSTMOUT
    clock.now += 59.0
    assert watch.stuck(None) is None
    clock.now += 2.0
    assert watch.stuck(None) == pytest.approx(61.0)


def test_a_new_subscription_gets_a_full_limit():
    clock = Clock()
    watch = MembershipWatch(60.0, clock)
    clock.now += 59.0
    assert watch.stuck(None) is None
    watch.restart()
    clock.now += 59.0
    assert watch.stuck(None) is None


def test_the_check_runs_once_per_interval_not_per_batch():
    clock = Clock()
    watch = MembershipWatch(60.0, clock)
    assert not watch.due()
    clock.now += CHECK_EVERY_S
    assert watch.due()
    watch.stuck("m")
    assert not watch.due()


def test_the_limit_is_several_session_timeouts():
    assert MembershipWatch.for_session_timeout(15000).limit_s == SESSIONS_WITHOUT_MEMBER_ID * 15.0
    assert SESSIONS_WITHOUT_MEMBER_ID >= 3  # one expired session is a lost partition, not a stuck client
    with pytest.raises(ValueError):
        MembershipWatch(0)


def test_a_subscription_matches_by_pattern_or_by_name():
    pattern = r"^br0101\.[^.]+\.[^.]+$"
    assert subscription_matches([pattern], ["br0101.public.customers", "guard.audit"])
    assert not subscription_matches([pattern], ["br0202.public.customers", "sanitized.br0101.public.customers"])
    assert subscription_matches([pattern, "br0101.message"], ["br0101.message"])
    assert not subscription_matches(["br0101.message"], ["br0101.messages"])
    assert not subscription_matches([pattern], [])
