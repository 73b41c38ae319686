"""The analyzers' shared state in Redis: idempotent counters, first-seen claims, entities and alert states.

Why Redis and not faust tables: every analyzer worker must see the same counts at once (a principal's
exports arrive on several partitions, read by different workers), a rule needs to look up state keyed by
something other than the partition key (a blind-index token, a subject, a principal), and a restarted or
rebalanced worker must not rebuild windows from a changelog before it may alert. A faust table is
partitioned like its stream and only its owner reads it. Redis is already the guard's durable, shared store
(`appendfsync always`), and every update here is idempotent per fact id, so at-least-once delivery
(a replay after a crash) never counts a fact twice.

Key names (docs/anomalies.md): every key starts with the tenant prefix `bg:{tenant}:` of the key store
(issue 20), then `anomaly:`; windows expire on their own (window + a day).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis

# HSETNX the fact id with its count; only a first sight adds to the total. Returns the total.
_ADD = """
local added = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if added == 1 then redis.call('HINCRBY', KEYS[1], '__total', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tonumber(redis.call('HGET', KEYS[1], '__total'))
"""

# Upsert an alert: count/first/last merge monotonically; version +1 on a change. Decides whether this
# version is to be written now (new, count doubled since the last write, or the interval passed).
# Returns {version, emit (0/1), count, first, last, state}.
_UPSERT = """
local k = KEYS[1]
local count, first, last, now, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'static', ARGV[6], 'count', count, 'first', first, 'last', last, 'version', 1,
             'emitted', 0, 'emitted_count', 0, 'emitted_at', 0, 'state', 'open', 'opened_at', now)
  redis.call('ZADD', KEYS[2], now, ARGV[7])
else
  local c = tonumber(redis.call('HGET', k, 'count'))
  local f = tonumber(redis.call('HGET', k, 'first'))
  local l = tonumber(redis.call('HGET', k, 'last'))
  local changed = false
  if count > c then redis.call('HSET', k, 'count', count); changed = true end
  if first < f then redis.call('HSET', k, 'first', first); changed = true end
  if last > l then redis.call('HSET', k, 'last', last); changed = true end
  if changed then
    redis.call('HINCRBY', k, 'version', 1)
    if redis.call('HGET', k, 'state') == 'resolved' then
      redis.call('HSET', k, 'state', 'open'); redis.call('ZADD', KEYS[2], now, ARGV[7])
    end
  end
end
-- alerts without a window end keep their id for good (first access, transfer, drift): their state, and so
-- their version, must outlive any expiry, or a repeat restarts at version 1 (docs/anomalies.md, "Keys")
if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', k, ARGV[8]) else redis.call('PERSIST', k) end
local v = tonumber(redis.call('HGET', k, 'version'))
local e = tonumber(redis.call('HGET', k, 'emitted'))
local ec = tonumber(redis.call('HGET', k, 'emitted_count'))
local ea = tonumber(redis.call('HGET', k, 'emitted_at'))
local cur = tonumber(redis.call('HGET', k, 'count'))
local emit = 0
if v > e and (e == 0 or cur >= 2 * ec or now - ea >= interval) then emit = 1 end
return {v, emit, cur, tonumber(redis.call('HGET', k, 'first')), tonumber(redis.call('HGET', k, 'last')),
        redis.call('HGET', k, 'state')}
"""

# After the alert's version was acknowledged by Kafka: remember it (monotonic).
_EMITTED = """
local e = tonumber(redis.call('HGET', KEYS[1], 'emitted') or '0')
if tonumber(ARGV[1]) > e then
  redis.call('HSET', KEYS[1], 'emitted', ARGV[1], 'emitted_count', ARGV[2], 'emitted_at', ARGV[3])
end
return 1
"""

# Queue a written critical version for the webhook (monotonic: an older version never replaces a newer one,
# and a version already delivered is not queued again). KEYS: page, due zset, alert; ARGV: id, version,
# record JSON, due time, now.
_QUEUE_PAGE = """
local d = tonumber(redis.call('HGET', KEYS[3], 'delivered') or '0')
local q = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[2]) <= d or tonumber(ARGV[2]) <= q then return 0 end
if q == 0 then redis.call('HSET', KEYS[1], 'since', ARGV[5], 'tries', 0) end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'record', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

# Claim due pages for one attempt: each claimed id's next attempt moves `lease` seconds on, so another worker
# (or this one's next tick) does not send it while the attempt runs. ARGV: now, lease, limit, ids (optional:
# only these). Returns the claimed ids.
_CLAIM_PAGES = """
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = {}
if #ARGV > 3 then
  for i = 4, #ARGV do
    local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if s and tonumber(s) <= now then ids[#ids + 1] = ARGV[i] end
  end
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
end
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now + lease, id) end
return ids
"""

# The webhook accepted `version`: the alert's delivered version (monotonic); the page is done unless a newer
# version was queued meanwhile. KEYS: page, due zset, alert; ARGV: id, version.
_DELIVERED = """
local v = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 and v > tonumber(redis.call('HGET', KEYS[3], 'delivered') or '0') then
  redis.call('HSET', KEYS[3], 'delivered', v)
end
if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') <= v then
  redis.call('DEL', KEYS[1]); redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""

ALERT_TTL_S = 30 * 86_400
#: Change and large-transaction times kept per customer for the takeover rule (the newest ones by fact time):
#: a customer with more contact changes than this within the key's life is an alert of its own.
PAIR_TIMES_KEPT = 100


def anomaly_prefix(tenant: str) -> str:
    """`bg:{tenant}:anomaly:`: the tenant prefix of the key store (issue 20), then this package's names."""
    if not tenant or any(c in tenant for c in ":*?[]{} "):
        raise ValueError(f"tenant {tenant!r} must be non-empty without ':', spaces or glob characters")
    return f"bg:{tenant}:anomaly:"


class AnomalyState:
    """The analyzers' state in Redis for one tenant. Every method is one round trip (a script or a pipeline)."""

    def __init__(self, client: redis.Redis, tenant: str, *, cache_s: float = 5.0) -> None:
        #: typed Any: redis-py's replies are bytes (no decode_responses), its stubs say bytes | str
        self.client: Any = client
        self.tenant = tenant
        self.prefix = anomaly_prefix(tenant)
        self._add = client.register_script(_ADD)
        self._upsert = client.register_script(_UPSERT)
        self._emitted = client.register_script(_EMITTED)
        self._queue_page = client.register_script(_QUEUE_PAGE)
        self._claim_pages = client.register_script(_CLAIM_PAGES)
        self._delivered = client.register_script(_DELIVERED)
        #: Reads that may be up to `cache_s` old (entities, learning starts): a principal disabled in the
        #: registry is seen as disabled within that time. First-seen claims owned by another fact are cached
        #: for good (a claim never changes owner). Both keep a fact at about one Redis write.
        self.cache_s = cache_s
        self._cache: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._claims: dict[tuple[str, str], str] = {}

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    # --- counters and sets (idempotent per fact id / member) ----------------------------------------
    def add(self, name: str, fact_id: str, n: int, ttl_s: int) -> int:
        """Add `n` for `fact_id` once (a replayed fact adds nothing); the counter's total."""
        return int(self._add(keys=[self.key("cnt", name)], args=[fact_id, n, ttl_s]))

    def add_many(self, adds: list[tuple[str, str, int, int]]) -> list[int]:
        """`add` for many (name, fact id, n, ttl) in one pipeline, in order; the running totals."""
        pipe = self.client.pipeline(transaction=False)
        for name, fact_id, n, ttl_s in adds:
            self._add(keys=[self.key("cnt", name)], args=[fact_id, n, ttl_s], client=pipe)
        return [int(x) for x in pipe.execute()]

    def distinct(self, name: str, member: str, ttl_s: int) -> int:
        """Add `member` to a set (idempotent); the set's size."""
        k = self.key("set", name)
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(k, member)
        pipe.expire(k, ttl_s)
        pipe.scard(k)
        return int(pipe.execute()[2])

    def members(self, name: str) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(self.key("set", name)))

    def _cached(self, key: tuple[str, ...], load: Any) -> Any:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load()
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = (now + self.cache_s, value)
        return value

    def claim_first(self, name: str, member: str, fact_id: str) -> bool:
        """True when `fact_id` is the first fact ever to claim `member` (its replays too): first-seen rules."""
        owner_known = self._claims.get((name, member))
        if owner_known is not None and owner_known != fact_id:
            return False
        k = self.key("first", name)
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(k, member, fact_id)
        pipe.hget(k, member)
        _, owner = pipe.execute()
        if owner is not None:
            if len(self._claims) > 1_000_000:
                self._claims.clear()
            self._claims[(name, member)] = owner.decode()
        return bool(owner is not None and owner.decode() == fact_id)

    def first_time(self, name: str, ts_ms: int) -> int:
        """The earliest time ever offered under `name` (kept as the minimum); used as a learning start."""
        cached = self._cache.get(("first_time", name))
        if cached is not None and cached[0] > time.monotonic() and int(cached[1]) <= ts_ms:
            return int(cached[1])
        k = self.key("time", name)
        value = int(self.client.eval("local c = redis.call('GET', KEYS[1]) "
                                    "if (not c) or tonumber(ARGV[1]) < tonumber(c) then "
                                    "redis.call('SET', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) end "
                                    "return tonumber(c)", 1, k, ts_ms))
        self._cache[("first_time", name)] = (time.monotonic() + self.cache_s, value)
        return value

    def add_time(self, name: str, member: str, ts_ms: int, ttl_s: int) -> None:
        """Remember that `member` (a fact id) happened at `ts_ms`, among the newest `PAIR_TIMES_KEPT` times.

        A sorted set, not the latest time alone: facts read out of order (a backlog, a restart, two topics)
        must still find every earlier or later partner within a rule's window. Idempotent per member."""
        k = self.key("times", name)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(k, {member: ts_ms})
        pipe.zremrangebyrank(k, 0, -PAIR_TIMES_KEPT - 1)
        pipe.expire(k, ttl_s)
        pipe.execute()

    def times_between(self, name: str, low_ms: int, high_ms: int) -> list[int]:
        """The times remembered under `name` in [low_ms, high_ms], oldest first."""
        return [int(score) for _, score in self.client.zrangebyscore(self.key("times", name), low_ms, high_ms,
                                                                      withscores=True)]

    # --- entities: principals and transfers ----------------------------------------------------------
    def set_entity(self, kind: str, name: str, doc: dict[str, Any], ts_ms: int) -> None:
        """Store an entity's latest state (a later fact wins; an older replay does not overwrite it)."""
        k = self.key("entity", kind)
        raw = self.client.hget(k, name)
        if raw is not None and int(orjson.loads(raw).get("ts_ms", 0)) > ts_ms:
            return
        self.client.hset(k, name, orjson.dumps({**doc, "ts_ms": ts_ms}))
        self._cache.pop(("entity", kind, name), None)
        self._cache.pop(("has", kind), None)

    def entity(self, kind: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """An entity's state (at most `cache_s` old unless `fresh`)."""
        def load() -> dict[str, Any] | None:
            raw = self.client.hget(self.key("entity", kind), name)
            return None if raw is None else dict(orjson.loads(raw))
        return load() if fresh else self._cached(("entity", kind, name), load)

    def entities(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k.decode(): dict(orjson.loads(v)) for k, v in self.client.hgetall(self.key("entity", kind)).items()}

    def has_entities(self, kind: str) -> bool:
        return bool(self._cached(("has", kind), lambda: self.client.exists(self.key("entity", kind))))

    # --- alerts ---------------------------------------------------------------------------------------
    def upsert_alert(self, alert_id: str, static: dict[str, Any], count: int, first_ms: int, last_ms: int,
                     evidence: list[tuple[str, str]], *, min_interval_s: float, now: float | None = None,
                     ) -> tuple[int, bool, int, int, int, str]:
        """Merge a condition's latest figures into its alert; (version, write now?, count, first, last, state)."""
        now = time.time() if now is None else now
        k = self.key("alert", alert_id)
        # An alert without a window end has an id that can recur at any time (first access, transfer cut-off,
        # drift): its state never expires, so a repeat after a quiet month gets a higher version, not a
        # version 1 the webhook's receiver already saw. These ids are bounded by the principals, cut-offs and
        # columns whose first-seen claims never expire either; windowed ids carry their window start and expire.
        ttl = ALERT_TTL_S if int(static.get("window_end_ms") or 0) else 0
        if evidence:
            ek = self.key("evidence", alert_id)
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(ek)
            size = pipe.execute()[0]
            if size < 20:
                pipe.rpush(ek, *[f"{kind}={ref}" for kind, ref in evidence[:20 - size]])
                if ttl:
                    pipe.expire(ek, ttl)
                else:
                    pipe.persist(ek)
                pipe.execute()
        r = self._upsert(keys=[k, self.key("open")],
                         args=[count, first_ms, last_ms, int(now), min_interval_s, orjson.dumps(static), alert_id,
                               ttl])
        return int(r[0]), bool(int(r[1])), int(r[2]), int(r[3]), int(r[4]), r[5].decode()

    def evidence(self, alert_id: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen = set()
        for raw in self.client.lrange(self.key("evidence", alert_id), 0, 99):
            kind, _, ref = raw.decode().partition("=")
            if (kind, ref) not in seen:
                seen.add((kind, ref))
                out.append((kind, ref))
        return out[:20]

    def mark_emitted(self, alert_id: str, version: int, count: int, now: float | None = None) -> None:
        self._emitted(keys=[self.key("alert", alert_id)], args=[version, count, int(time.time() if now is None
                                                                                        else now)])

    def alert_state(self, alert_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.key("alert", alert_id))
        if not raw:
            return None
        doc = {k.decode(): v.decode() for k, v in raw.items()}
        return {**orjson.loads(doc["static"]), **{k: int(doc[k]) for k in ("count", "first", "last", "version",
                                                                           "emitted", "emitted_count")},
                "delivered": int(doc.get("delivered", 0)), "state": doc["state"]}

    def open_alert_ids(self) -> list[str]:
        return [m.decode() for m in self.client.zrange(self.key("open"), 0, -1)]

    def resolve(self, alert_id: str) -> int | None:
        """Mark an alert resolved (version +1); its new version, None if unknown or already resolved."""
        k = self.key("alert", alert_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(k, "state")
        pipe.zrem(self.key("open"), alert_id)
        state, _ = pipe.execute()
        if state is None or state == b"resolved":
            return None
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(k, "state", "resolved")
        pipe.hincrby(k, "version", 1)
        return int(pipe.execute()[1])

    # --- pages: written critical versions the webhook has not accepted yet ------------------------------
    # `page:<id>` (hash: version, record, since, tries, error) and `pages` (zset: id → next attempt) never
    # expire: a page stays until the webhook accepted it, however long the receiver is away. Only undelivered
    # critical alerts are in them, so they stay small.
    def queue_page(self, alert_id: str, version: int, record: dict[str, Any], now: float) -> bool:
        """Queue a written critical version for the webhook, due at once; False when it (or a newer one) is
        already queued or delivered."""
        return bool(self._queue_page(keys=[self.key("page", alert_id), self.key("pages"), self.key("alert", alert_id)],
                                     args=[alert_id, version, orjson.dumps(record), now, int(now)]))

    def claim_pages(self, now: float, lease_s: float, *, ids: list[str] | None = None,
                    limit: int = 100) -> list[tuple[str, int, dict[str, Any], int]]:
        """Due pages, each claimed for `lease_s` (another worker skips it meanwhile): (id, version, record,
        tries so far)."""
        if ids is not None and not ids:
            return []
        claimed = self._claim_pages(keys=[self.key("pages")], args=[now, lease_s, limit, *(ids or [])])
        out = []
        for raw in claimed:
            aid = raw.decode()
            page = self.client.hmget(self.key("page", aid), "version", "record", "tries")
            if page[0] is None:  # delivered by another worker meanwhile
                self.client.zrem(self.key("pages"), aid)
                continue
            out.append((aid, int(page[0]), dict(orjson.loads(page[1])), int(page[2] or 0)))
        return out

    def page_delivered(self, alert_id: str, version: int) -> None:
        self._delivered(keys=[self.key("page", alert_id), self.key("pages"), self.key("alert", alert_id)],
                        args=[alert_id, version])

    def page_failed(self, alert_id: str, tries: int, error: str, next_at: float) -> None:
        """Record a failed attempt and when the next one is due."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key("page", alert_id), mapping={"tries": tries, "error": error[:300]})
        pipe.zadd(self.key("pages"), {alert_id: next_at}, xx=True)
        pipe.execute()

    def pages(self) -> list[dict[str, Any]]:
        """Every undelivered page (the status page): id, version, since, tries, the last error, next attempt,
        and the alert's rule, branch and summary."""
        out = []
        for raw, due in self.client.zrange(self.key("pages"), 0, -1, withscores=True):
            aid = raw.decode()
            page = {k.decode(): v for k, v in self.client.hgetall(self.key("page", aid)).items()}
            if not page:
                continue
            record = dict(orjson.loads(page["record"]))
            out.append({"id": aid, "version": int(page["version"]), "since": int(page.get("since", b"0")),
                        "tries": int(page.get("tries", b"0")), "error": page.get("error", b"").decode(),
                        "next_at": float(due), "rule": record.get("rule"), "branch": record.get("branch"),
                        "severity": record.get("severity"), "summary": record.get("summary")})
        return out
