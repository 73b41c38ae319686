"""Per-principal rate limits of the reveal service, shared by every instance through the key store's Redis.

A sliding-window counter: one counter per principal and window (`bg:{tenant}:reveal:<budget>:{principal}:{n}`,
n = unix time // window), and a request of cost c is allowed when

    previous window's count × (the part of it still inside the sliding window) + this window's count + c
        ≤ limit

so a principal can't get twice the limit by straddling a window boundary, as with fixed windows. One Lua
script checks and counts atomically, so concurrent requests on several service instances can't overshoot.
A refused request is not counted. The cost is the number of records (reveal) or values (search) a request
names, so a bulk request costs what the same requests one by one would cost.

Budgets: `rate` (records and searched values, `reveal_rate_limit` per `reveal_rate_window_s`) and, for search
only, `search-rate` (`reveal_search_rate_limit` per `reveal_search_rate_window_s`), a limiter `within` the
first: a search must fit both, and is then counted in both, by the same script (a search refused by either
budget is counted in neither). Search has its own, much smaller budget because a masked value and its blind
index let a searcher confirm guesses (docs/reveal.md, "Rate limits").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from guard.errors import KeyUnavailableError
from guard.keys.store import RedisKeyStore

_HIT = """
-- KEYS: per budget, this window's counter then the previous window's.
-- ARGV: cost, then per budget: limit, weight of its previous window (0..1), ttl ms.
-- Every budget is checked before any is counted: {0, budget refused (1-based), its count} or {1, 0, the
-- first budget's count with this request}.
local cost = tonumber(ARGV[1])
local first = 0
for i = 1, #KEYS / 2 do
  local cur = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local used = prev * tonumber(ARGV[3 * i]) + cur
  if used + cost > tonumber(ARGV[3 * i - 1]) then return {0, i, math.ceil(used)} end
  if i == 1 then first = used end
end
for i = 1, #KEYS / 2 do
  local n = redis.call('INCRBY', KEYS[2 * i - 1], cost)
  if n == cost then redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[3 * i + 1]) end
end
return {1, 0, math.ceil(first + cost)}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    #: Records counted in the sliding window (rounded up), this request included when allowed; when refused,
    #: the refusing budget's count.
    used: int
    limit: int
    #: Seconds until the oldest counted window has slid out (a `Retry-After` hint when refused).
    retry_after_s: int
    #: The budget that decided (the refusing one, or the limiter's own when allowed) and its window.
    window_s: int = 60
    budget: str = "rate"


class RateLimiter:
    """`hit(principal, cost)`: whether the principal may ask for `cost` more records or values now, within
    this limiter's budget and those of the limiters it is `within` (and counts them in all of them).

    `budget` names the counters' keys (`rate`: the reveal service's shared budget; `search-rate`: search's
    own), so two budgets of one principal never share a counter.
    """

    def __init__(self, store: RedisKeyStore, *, limit: int, window_s: int = 60, budget: str = "rate",
                 within: RateLimiter | None = None) -> None:
        if limit < 1 or window_s < 1:
            raise ValueError("a rate limit and its window are positive")
        self._store = store
        self._script = store.client.register_script(_HIT)
        self.limit = limit
        self.window_s = window_s
        self.budget = budget
        self.within = within

    def budgets(self) -> list[RateLimiter]:
        """This limiter, then the ones it is within (outwards)."""
        chain: list[RateLimiter] = []
        limiter: RateLimiter | None = self
        while limiter is not None and limiter not in chain:
            chain.append(limiter)
            limiter = limiter.within
        return chain

    def hit(self, principal: str, cost: int, *, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        chain = self.budgets()
        keys: list[str] = []
        args: list[str | int] = [cost]
        windows: list[int] = []
        for limiter in chain:
            window = int(now // limiter.window_s)
            windows.append(window)
            weight = 1.0 - (now - window * limiter.window_s) / limiter.window_s
            keys += [self._store.name("reveal", limiter.budget, principal, str(window)),
                     self._store.name("reveal", limiter.budget, principal, str(window - 1))]
            args += [limiter.limit, f"{weight:.6f}", limiter.window_s * 2 * 1000]
        try:
            allowed, refused_by, used = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise KeyUnavailableError(f"key store unreachable ({type(exc).__name__}): rate limits can't be "
                                      "checked") from None
        which = int(refused_by) - 1 if not allowed else 0
        decided = chain[which]
        retry = max(1, int((windows[which] + 1) * decided.window_s - now + 0.999))
        return RateDecision(bool(allowed), int(used), decided.limit, retry, decided.window_s, decided.budget)
