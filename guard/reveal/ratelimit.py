"""Per-principal rate limits of the reveal service, shared by every instance through the key store's Redis.

A sliding-window counter: one counter per principal and window (`bg:{tenant}:reveal:rate:{principal}:{n}`, n =
unix time // window), and a request of cost c is allowed when

    previous window's count × (the part of it still inside the sliding window) + this window's count + c
        ≤ limit

so a principal can't get twice the limit by straddling a window boundary, as with fixed windows. One Lua
script checks and counts atomically, so concurrent requests on several service instances can't overshoot.
A refused request is not counted. The cost is the number of records (reveal) or values (search) a request
names, so a bulk request costs what the same requests one by one would cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from guard.errors import KeyUnavailableError
from guard.keys.store import RedisKeyStore

_HIT = """
-- KEYS: this window's counter, the previous window's. ARGV: cost, limit, weight of the previous (0..1), ttl ms
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local cost = tonumber(ARGV[1])
local used = prev * tonumber(ARGV[3]) + cur
if used + cost > tonumber(ARGV[2]) then return {0, math.ceil(used)} end
local n = redis.call('INCRBY', KEYS[1], cost)
if n == cost then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {1, math.ceil(used + cost)}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    #: Records counted in the sliding window (rounded up), this request included when allowed.
    used: int
    limit: int
    #: Seconds until the oldest counted window has slid out (a `Retry-After` hint when refused).
    retry_after_s: int


class RateLimiter:
    """`hit(principal, cost)`: whether the principal may reveal `cost` more records now (and counts them)."""

    def __init__(self, store: RedisKeyStore, *, limit: int, window_s: int = 60) -> None:
        if limit < 1 or window_s < 1:
            raise ValueError("a rate limit and its window are positive")
        self._store = store
        self._script = store.client.register_script(_HIT)
        self.limit = limit
        self.window_s = window_s

    def hit(self, principal: str, cost: int, *, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        window = int(now // self.window_s)
        weight = 1.0 - (now - window * self.window_s) / self.window_s
        keys = [self._store.name("reveal", "rate", principal, str(window)),
                self._store.name("reveal", "rate", principal, str(window - 1))]
        try:
            allowed, used = self._script(keys=keys, args=[cost, self.limit, f"{weight:.6f}",
                                                          self.window_s * 2 * 1000])
        except redis.RedisError as exc:
            raise KeyUnavailableError(f"key store unreachable ({type(exc).__name__}): rate limits can't be "
                                      "checked") from None
        retry = max(1, int((window + 1) * self.window_s - now + 0.999))
        return RateDecision(bool(allowed), int(used), self.limit, retry)
