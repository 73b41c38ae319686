"""The key store's Lua scripts (`guard.keys.store.RedisKeyStore` registers and calls them).

Each runs atomically on Redis: a check and the write it allows can't be split by another worker (a data
key created twice, a shred racing a re-creation, an erasure scheduled over a cancelled one). Their keys and
arguments are documented above each; the layout of the names they touch is in `guard.keys.store`'s docstring.
"""

from __future__ import annotations

# A new data key wrapped under a branch-key version below the branch key's `floor` (versions a transfer is
# retiring) is refused ({-2}): the writer's cached branch key is stale; it re-reads it and wraps again.
# The wrapped key's header is 0x01 | branch-key version (u32, big-endian) | ...
FLOOR_CHECK = """
local function below_floor(kek, wrapped)
  local floor = tonumber(redis.call('HGET', kek, 'floor') or '0')
  if floor == 0 then return false end
  local b1, b2, b3, b4 = string.byte(wrapped, 2, 5)
  return ((b1 * 256 + b2) * 256 + b3) * 256 + b4 < floor
end
"""

CREATE_DEK = FLOOR_CHECK + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, false} end
local cur = redis.call('HGET', KEYS[1], 'current')
if cur then return {tonumber(cur), redis.call('HGET', KEYS[1], 'v' .. cur)} end
if KEYS[3] and below_floor(KEYS[3], ARGV[1]) then return {-2, false} end
redis.call('HSET', KEYS[1], 'current', 1, 'v1', ARGV[1], 'created', ARGV[2])
return {1, ARGV[1]}
"""

# Why the scripts below look a subject's erased marker up only when it has no key hash: the shred deletes the
# hash and sets the marker in one script, and no script creates, rotates or re-wraps a key for a subject with a
# marker (`CREATE_DEK`, `ROTATE_DEK`, `REWRAP_DEK` check it first), so a subject with a key hash is not
# erased. Reading the key first spares a steady stream's every key read an `EXISTS` (docs/benchmark.md,
# round 21). Their replies are flat, two entries per subject: a table per subject cost Redis as much again.

# `CREATE_DEK` for a batch of subjects in one script call (a batch's key prefetch): one command to build,
# send and run instead of one per subject. KEYS[1]: branch key hash. ARGV[1]: now, ARGV[2]: the prefix of
# the subjects' key hashes, ARGV[3]: of their erased markers, ARGV[4]: JSON [subject, ...] (keys named here,
# as in `GET_DEKS`: two key names per subject were most of the command to pack and parse); then per subject
# the wrapped key to store if absent, all wrapped under one branch-key version. Returns per subject two
# entries: version, then the stored wrapped key, or false where this call stored the one it was given;
# -1, false: erased. {-2} alone if the wrapping branch-key version is below the floor (nothing created:
# the caller re-wraps and retries).
CREATE_DEKS = FLOOR_CHECK + """
local out, create = {}, {}
local subjects = cjson.decode(ARGV[4])
for n, subject in ipairs(subjects) do
  local dek = ARGV[2] .. subject
  local cur = redis.call('HGET', dek, 'current')
  if cur then
    out[2 * n - 1] = tonumber(cur)
    out[2 * n] = redis.call('HGET', dek, 'v' .. cur)
  elseif redis.call('EXISTS', ARGV[3] .. subject) == 1 then
    out[2 * n - 1] = -1
    out[2 * n] = false
  else
    create[#create + 1] = n
  end
end
if #create > 0 and below_floor(KEYS[1], ARGV[create[1] + 4]) then return {-2} end
for _, n in ipairs(create) do
  redis.call('HSET', ARGV[2] .. subjects[n], 'current', 1, 'v1', ARGV[n + 4], 'created', ARGV[1])
  out[2 * n - 1] = 1
  out[2 * n] = false
end
return out
"""

# The keys of a batch's subjects, creating none (a prefetch whose subjects' keys mostly exist: no key is minted
# and wrapped for them). ARGV[1]: the prefix of the subjects' key hashes, ARGV[2]: of their erased markers,
# ARGV[3]: JSON [subject, ...] (keys named here, as in `RECORD_ACTIVITY`). Returns per subject two entries:
# version, wrapped key; -1, false (erased) or 0, false (no key yet).
GET_DEKS = """
local out = {}
for n, subject in ipairs(cjson.decode(ARGV[3])) do
  local dek = ARGV[1] .. subject
  local cur = redis.call('HGET', dek, 'current')
  if cur then
    out[2 * n - 1] = tonumber(cur)
    out[2 * n] = redis.call('HGET', dek, 'v' .. cur)
  else
    out[2 * n - 1] = redis.call('EXISTS', ARGV[2] .. subject) == 1 and -1 or 0
    out[2 * n] = false
  end
end
return out
"""

ROTATE_DEK = FLOOR_CHECK + """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if KEYS[3] and below_floor(KEYS[3], ARGV[1]) then return -2 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
local nxt = cur + 1
redis.call('HSET', KEYS[1], 'current', nxt, 'v' .. nxt, ARGV[1])
return nxt
"""

SHRED = """
-- KEYS: dek hash, erased marker, pending confirmations hash, erasure epoch, compaction shreds counter, expiry zset,
--       hold set, scheduled erasures zset, scheduled erasures hash, storage-only marker
-- ARGV: shred record, subject, expected number of key versions, pending entry (JSON, '' for none), channel,
--       invalidation message (the epoch is appended), the deferred erasure if the subject is held (JSON, '' for
--       none), the held confirmation's pending entry (JSON, '' for none)
-- A held subject is not shredded: its erasure is recorded as deferred (carried out when the hold is released),
-- its schedule removed (a schedule left in place was claimed again after every lease and confirmed again), and
-- its held confirmation kept pending until a committed transaction carries it, all in this call.
local versions = 0
local fields = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(fields) do if string.sub(f, 1, 1) == 'v' then versions = versions + 1 end end
local already = redis.call('EXISTS', KEYS[2])
if versions == 0 and already == 1 then return {0, 1, 0} end
if redis.call('SISMEMBER', KEYS[7], ARGV[2]) == 1 then
  if ARGV[7] and ARGV[7] ~= '' then
    redis.call('SET', KEYS[10], ARGV[7])
    redis.call('ZREM', KEYS[8], ARGV[2])
    redis.call('HDEL', KEYS[9], ARGV[2])
    if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[8]) end
  end
  return {-2, already, 0}
end
if versions ~= tonumber(ARGV[3]) then return {-1, already, 0} end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
redis.call('ZREM', KEYS[6], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('HDEL', KEYS[9], ARGV[2])
local epoch = redis.call('INCR', KEYS[4])
if versions > 0 then redis.call('INCR', KEYS[5]) end
redis.call('PUBLISH', ARGV[5], ARGV[6] .. ':' .. epoch)
return {versions, already, epoch}
"""

COMPACTED = """
-- KEYS: compact-covered, legacy compact-due. ARGV: the compact-shreds count read before the rewrite started,
-- the legacy counter read then. Raises compact-covered to the count (never lowers it) and lowers the legacy
-- counter by what was read of it (never below 0).
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then redis.call('SET', KEYS[1], ARGV[1]) end
local legacy = tonumber(ARGV[2])
if legacy > 0 then
  local left = tonumber(redis.call('GET', KEYS[2]) or '0') - legacy
  if left > 0 then redis.call('SET', KEYS[2], left) else redis.call('DEL', KEYS[2]) end
end
return 1
"""

SHRED_PREVIEW = """
local versions = 0
local fields = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(fields) do if string.sub(f, 1, 1) == 'v' then versions = versions + 1 end end
return {versions, redis.call('EXISTS', KEYS[2])}
"""

CONFIRM_DELIVERED = """
-- KEYS[1]: pending hash; ARGV: subject, id pairs. Removes an entry only if it is still that confirmation.
local removed = 0
for i = 1, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw and cjson.decode(raw)['id'] == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i]); removed = removed + 1
  end
end
return removed
"""

CLAIM_PENDING = """
-- KEYS[1]: pending hash; ARGV: subject, entry as read, entry with the claimer as owner, for each subject.
-- Claims an entry to re-emit it only if it is still exactly what the claimer read: of two workers that read
-- the same stale entry, one re-emits it (a plain HSET let both, two copies of one confirmation). Returns the
-- subjects claimed.
local won = {}
for i = 1, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]); table.insert(won, ARGV[i])
  end
end
return won
"""

SCHEDULE_ERASURES = """
-- KEYS: due zset, info hash, erasure epoch, expiry zset. ARGV[1]: the prefix of the subjects' erased markers;
-- then per subject: subject, due time, info. Schedules each subject neither erased nor scheduled already (an
-- earlier schedule stands). Returns {how many it scheduled, the erasure epoch, scheduled erasures, retention
-- expiries}: the last three are what a commit checks (`commit_view`), read after its schedules in the same
-- call, so a re-insert later in the batch finds its erasure scheduled. One call per transaction.
local n = 0
for i = 2, #ARGV, 3 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    n = n + 1
  end
end
return {n, tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])}
"""

CLAIM_DUE = """
-- KEYS: due zset, info hash. ARGV: now, lease end, limit. Moves each due erasure's time to the lease end
-- (so no other worker takes it meanwhile; after a crash it is due again when the lease ends) and returns
-- subject, info pairs. The shred script removes the entry.
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, s in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], s)
  table.insert(out, s)
  table.insert(out, redis.call('HGET', KEYS[2], s) or '{}')
end
return out
"""

ROOT_CHANGED = """
-- KEYS: due zset, info hash, expiry zset. ARGV[1]: n; ARGV[2..n+1]: subjects whose root row exists again
-- (re-inserted/updated); then pairs (subject, expiry in unix s, or '' to remove it).
-- Cancels the subjects' scheduled erasures and the retention that a relationship_end delete started, then
-- sets the transaction's retention expiries (`set_expiry`), in that order, in one call.
local cancelled, resumed = {}, {}
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  local s = ARGV[i]
  if redis.call('ZREM', KEYS[1], s) == 1 then redis.call('HDEL', KEYS[2], s); table.insert(cancelled, s) end
  if redis.call('ZREM', KEYS[3], s) == 1 then table.insert(resumed, s) end
end
for i = n + 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('ZREM', KEYS[3], ARGV[i])
  else redis.call('ZADD', KEYS[3], ARGV[i + 1], ARGV[i]) end
end
return {cancelled, resumed}
"""

RECORD_ACTIVITY = """
-- KEYS[1]: expiry zset, KEYS[2]: the branch's registry of topics with activity.
-- ARGV[1]: the prefix of the per-topic subject sets, ARGV[2]: of the subjects' erased markers,
-- ARGV[3]: JSON {topic: [subject, ...]}, ARGV[4]: JSON [[subject, expiry (unix s)], ...].
-- One SADD of many members per topic: a transaction's ~1,500 pairs each cost an EXISTS and an SADD to the
-- subject's own set inside this loop before, ~2.6 us of the key store's time per pair against ~0.65 us
-- (docs/benchmark.md, rounds 20 and 21). An erased subject may still be added to a topic's set (its key is
-- gone; the erasure read the sets before its shred); it never gets an expiry, which would make the retention
-- sweep erase it again. Subjects are members, never key names: the per-topic sets' names carry the topic.
for topic, subjects in pairs(cjson.decode(ARGV[3])) do
  redis.call('SADD', KEYS[2], topic)
  for i = 1, #subjects, 500 do
    redis.call('SADD', ARGV[1] .. topic, unpack(subjects, i, math.min(i + 499, #subjects)))
  end
end
for _, item in ipairs(cjson.decode(ARGV[4])) do
  if redis.call('EXISTS', ARGV[2] .. item[1]) == 0 then
    redis.call('ZADD', KEYS[1], 'GT', item[2], item[1])
  end
end
return 0
"""

# The sanitized topics a subject's ciphertexts went to. KEYS[1]: the branch's registry of topics with activity,
# KEYS[2]: the subject's own set of topics (the layout workers before f6fcade wrote, still read: a key store
# written by an older worker). ARGV[1]: the prefix of the per-topic subject sets, ARGV[2]: the subject.
SUBJECT_TOPICS = """
local out = redis.call('SMEMBERS', KEYS[2])
for _, topic in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('SISMEMBER', ARGV[1] .. topic, ARGV[2]) == 1 then out[#out + 1] = topic end
end
return out
"""

INSTALL_HANDOVER_KEK = """
-- KEYS[1]: the branch key hash. ARGV: transfer id, the current version the caller saw, the new key wrapped
-- by the master key under the name of version current + 1. Idempotent per transfer id: a rerun gets the
-- version it installed. The new version becomes current and the floor (below it: retiring, no new wraps).
local h = redis.call('HGET', KEYS[1], 'handover')
if h then
  local sp = string.find(h, ' ', 1, true)
  if string.sub(h, 1, sp - 1) == ARGV[1] then return tonumber(string.sub(h, sp + 1)) end
  return -2
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
if cur ~= tonumber(ARGV[2]) then return -1 end
local nxt = cur + 1
redis.call('HSET', KEYS[1], 'current', nxt, 'v' .. nxt, ARGV[3], 'floor', nxt, 'handover', ARGV[1] .. ' ' .. nxt)
return nxt
"""

RETIRE_BELOW_FLOOR = """
-- KEYS[1]: the branch key hash. Deletes every version below the floor; returns how many it deleted.
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local n = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 1) == 'v' and tonumber(string.sub(f, 2)) and tonumber(string.sub(f, 2)) < floor then
    redis.call('HDEL', KEYS[1], f); n = n + 1
  end
end
return n
"""

REWRAP_DEK = """
-- KEYS: dek hash, erased marker. ARGV: field, expected wrapped, new wrapped, ... Compare-and-set of every
-- field at once: 0 if one changed meanwhile (read again), -1 if the subject was erased, else the count.
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
for i = 1, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then return 0 end
end
for i = 1, #ARGV, 3 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]) end
return #ARGV / 3
"""

ADD_VERSION = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
local nxt = cur + 1
redis.call('HSET', KEYS[1], 'current', nxt, 'v' .. nxt, ARGV[1])
return nxt
"""

# KEYS: registry, branches, tkey<purpose>...; ARGV: now, then (purpose, wrapped) pairs in KEYS order.
# Returns {1, v1, v2, ...} (all present or all minted now) or {-1, missing purposes...} (fail closed).
TENANT_KEYS = """
local n = #KEYS - 2
local values, missing, present = {}, {}, 0
for i = 1, n do
  local v = redis.call('GET', KEYS[i + 2])
  values[i] = v
  if v then present = present + 1 else table.insert(missing, ARGV[2 * i]) end
end
if present == n then return {1, unpack(values)} end
if present > 0 or redis.call('EXISTS', KEYS[1]) == 1 or redis.call('SCARD', KEYS[2]) > 0 then
  return {-1, unpack(missing)}
end
for i = 1, n do
  redis.call('SET', KEYS[i + 2], ARGV[2 * i + 1])
  redis.call('HSET', KEYS[1], ARGV[2 * i], ARGV[1])
  values[i] = ARGV[2 * i + 1]
end
return {1, unpack(values)}
"""
