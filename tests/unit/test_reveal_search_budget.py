"""Search's own rate budget (found by review): a teller could recover a masked mobile by search.

A sanitized record shows `138****1234` and the value's blind index; tellers may search C2 indexed columns
(policy/branch.cedar, `search-for-service-and-kyc`), so searching the 10^4 candidates of the four hidden digits
finds the one whose token matches. The only brake was the 600-values-per-minute budget shared with reveal:
17 minutes. Now a search counts, before anything else is computed, against a budget of its own
(`reveal_search_rate_limit` per `reveal_search_rate_window_s`, default 100 per 3600 s: 100 hours for 10^4
candidates) as well as the shared one; the shared budget stays as it was.

The key store is an in-memory double whose script does what `ratelimit._HIT` does in Redis (every budget
checked before any is counted); tests/integration/test_reveal_service.py runs the real script.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from guard.classify.catalog import Catalog
from guard.config import Settings
from guard.errors import ConfigError
from guard.reveal import ratelimit
from guard.reveal.server import rate_limiters
from guard.reveal.service import RecordRef, Refused, RevealService
from tests.unit.test_reveal_api import AllowAll, Sink

NOW = 1_800_000_000.5
WHO = "Staff::t0101-01"
CUSTOMERS = "sanitized.br0101.public.customers"


class FakeRedis:
    """The rate script over a dict, as Redis runs it: whole, nothing in between."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def register_script(self, script: str) -> Callable[..., list[int]]:
        assert script == ratelimit._HIT, "a script the double does not know"

        def run(keys: list[str], args: list[Any]) -> list[int]:
            cost, first = int(args[0]), 0.0
            for i in range(len(keys) // 2):
                limit, weight = int(args[3 * i + 1]), float(args[3 * i + 2])
                used = self.data.get(keys[2 * i + 1], 0) * weight + self.data.get(keys[2 * i], 0)
                if used + cost > limit:
                    return [0, i + 1, math.ceil(used)]
                first = used if i == 0 else first
            for i in range(len(keys) // 2):
                self.data[keys[2 * i]] = self.data.get(keys[2 * i], 0) + cost
            return [1, 0, math.ceil(first + cost)]

        return run


class FakeStore:
    def __init__(self) -> None:
        self.client = FakeRedis()

    def name(self, *parts: str) -> str:
        return "bg:{demo-bank}:" + ":".join(parts)

    def counted(self, budget: str, principal: str = WHO) -> int:
        return sum(v for k, v in self.client.data.items() if k.startswith(self.name("reveal", budget, principal, "")))


class Keys:
    def __init__(self) -> None:
        self.tokens_computed = 0

    def search_token(self, column: str, value: bytes) -> str:
        self.tokens_computed += 1
        return "token"


class NothingThere:
    """A fetcher with no record at any position: a reveal that passes the rate limit answers `not_found`."""

    def allowed_topic(self, topic: str) -> bool:
        return True

    def fetch(self, topic: str, partition: int, offset: int) -> Any:
        return None


def _service(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> tuple[RevealService, FakeStore, Sink, Keys]:
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: NOW))  # one instant: no window slides
    store, sink, keys = FakeStore(), Sink(), Keys()
    limiter, search_limiter = rate_limiters(settings, store)  # type: ignore[arg-type]
    service = RevealService(settings, keys, Catalog.load(None), AllowAll(), NothingThere(), sink,  # type: ignore[arg-type]
                            None, limiter, search_limiter=search_limiter)  # type: ignore[arg-type]
    return service, store, sink, keys


def _search(service: RevealService, values: Sequence[str], rid: str) -> Any:
    return service.search(WHO, "customer_service", "public.customers", "mobile", values, rid)


def test_the_101st_searched_value_in_the_window_is_refused_while_reveals_still_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.reveal_search_rate_limit, settings.reveal_search_rate_window_s) == (100, 3600)
    assert (settings.reveal_rate_limit, settings.reveal_rate_window_s) == (600, 60), "the reveal budget is unchanged"
    service, store, sink, keys = _service(monkeypatch, settings)
    candidates = [f"138{n:04d}1234" for n in range(101)]  # the hidden digits of 138****1234

    assert _search(service, candidates[:100], "rid-1").decision == "allowed"
    with pytest.raises(Refused) as err:
        _search(service, candidates[100:], "rid-2")
    assert err.value.status == 429 and err.value.code == "rate_limited" and err.value.retry_after_s
    assert err.value.detail == "search rate limit of 100 values per 3600 s reached"
    assert keys.tokens_computed == 100, "a token was computed for the refused value"
    refused = sink.decoded()[-1]
    why = orjson.loads(refused["reason"])
    assert (refused["op"], refused["decision"], refused["trace_id"]) == ("search", "search_denied", "rid-2")
    assert why["why"] == "rate_limited" and why["budget"] == "search-rate" and why["principal"] == WHO
    assert why["values"] == 1 and refused["actions"] == {"asked": 1}
    assert candidates[100] not in orjson.dumps(refused).decode()

    refs = [RecordRef(CUSTOMERS, 0, n, ("mobile",)) for n in range(100)]
    results = service.reveal(WHO, "kyc_review", refs, "rid-3")  # not refused: the reveal budget has room
    assert {r.decision for r in results} == {"not_found"}
    assert store.counted("search-rate") == 100 and store.counted("rate") == 200
    other = service.search("Staff::t0101-02", "customer_service", "public.customers", "mobile", ["1"], "rid-4")
    assert other.decision == "allowed", "the budget is per principal"


def test_a_search_refused_by_either_budget_is_counted_in_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dataclasses.replace(Settings(), reveal_rate_limit=10)
    service, store, sink, _ = _service(monkeypatch, settings)
    service.reveal(WHO, "kyc_review", [RecordRef(CUSTOMERS, 0, n, ("mobile",)) for n in range(8)], "rid-1")
    with pytest.raises(Refused) as err:  # 8 records + 3 values > 10: the shared budget refuses
        _search(service, ["1", "2", "3"], "rid-2")
    assert err.value.detail == "rate limit of 10 records and searched values per 60 s reached"
    assert orjson.loads(sink.decoded()[-1]["reason"])["budget"] == "rate"
    assert store.counted("search-rate") == 0 and store.counted("rate") == 8
    assert _search(service, ["1", "2"], "rid-3").decision == "allowed"
    assert store.counted("search-rate") == 2 and store.counted("rate") == 10


@pytest.mark.parametrize("name", ["reveal_search_rate_limit", "reveal_search_rate_window_s"])
def test_a_search_budget_that_is_not_positive_is_a_config_error_that_says_what_to_set(name: str) -> None:
    with pytest.raises(ConfigError, match=f"GUARD_{name.upper()} to 1 or more"):
        rate_limiters(dataclasses.replace(Settings(), **{name: 0}), FakeStore())  # type: ignore[arg-type]
