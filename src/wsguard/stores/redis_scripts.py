"""The Lua scripts of the Redis store: each one is a single atomic step.

Time is the Redis server's (``TIME``), never a node's clock, so nodes with
skewed clocks still agree on windows, leases and bans. Scripts that touch
several keys only touch keys that share a hash tag (Redis Cluster safe).
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The sliding window counter (same algorithm as the memory store): the previous
# fixed window weighted by its overlap with the sliding one, plus the current.
_WINDOW = """
local function window_state(key, window, now)
  local start = now - (now % window)
  local v = redis.call('HMGET', key, 's', 'p', 'c')
  local s, p, c = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if s == nil or s < start - window then p, c = 0, 0
  elseif s < start then p, c = c, 0 end
  local est = p * (1 - (now - start) / window) + c
  return start, p, c, est
end
local function window_wait(start, p, c, limit, window, now)
  local ready = start + window
  if c + 1 <= limit and p > 0 then
    ready = start + window * (1 - (limit - c - 1) / p)
  end
  return math.max(1, math.ceil(ready - now))
end
"""

# The token bucket (same algorithm as the memory store's pace): *burst* tokens when
# unknown, refilled at *rate* per ms; the hash expires once it would be full again (then
# unknown means the same). Returns 0 when a token was taken, else the ms until one is back.
_BUCKET = """
local function bucket_take(key, rate, burst, now)
  local v = redis.call('HMGET', key, 'k', 't')
  local tokens, last = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or last == nil then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
  end
  if tokens < 1 then return math.max(1, math.ceil((1 - tokens) / rate)) end
  tokens = tokens - 1
  redis.call('HSET', key, 'k', string.format('%.17g', tokens), 't', now)
  redis.call('PEXPIRE', key, math.max(1, math.ceil((burst - tokens) / rate)))
  return 0
end
"""

#: KEYS[1] bucket hash; ARGV rate (tokens per second), burst -> wait_ms (0: token taken).
PACE = (
    _NOW
    + _BUCKET
    + """
return bucket_take(KEYS[1], tonumber(ARGV[1]) / 1000, tonumber(ARGV[2]), now)
"""
)

#: KEYS[1] the nonce; ARGV the message's timestamp (Unix ms) and the window (ms).
#: Returns 1 fresh (recorded until timestamp + window), 0 replayed, 2 stale: both on the
#: server's clock, so nodes with skewed clocks agree.
RECORD_NONCE = (
    _NOW
    + """
local ts, window = tonumber(ARGV[1]), tonumber(ARGV[2])
if math.abs(now - ts) > window then return 2 end
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', math.max(1, ts + window - now)) then
  return 1
end
return 0
"""
)

#: KEYS[1] zset of holders scored by lease expiry; ARGV limit, holder, ttl_ms.
ACQUIRE = (
    _NOW
    + """
local key, limit, holder, ttl = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, holder) and redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, now + ttl, holder)
redis.call('PEXPIRE', key, ttl)
return 1
"""
)

#: KEYS[1] zset; ARGV ttl_ms, limit, holder... : extend this node's leases. A lease Redis
#: lost (it lapsed during a pause or a partition) is re-created only while the key is under
#: its limit, as a new one would be; the holders that could not be are returned (lost).
RENEW = (
    _NOW
    + """
local key, ttl, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local lost = {}
for i = 3, #ARGV do
  local holder = ARGV[i]
  if redis.call('ZSCORE', key, holder) or redis.call('ZCARD', key) < limit then
    redis.call('ZADD', key, now + ttl, holder)
  else
    lost[#lost + 1] = holder
  end
end
redis.call('PEXPIRE', key, ttl)
return lost
"""
)

#: KEYS[1] zset: live holders.
COUNT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

#: KEYS[1] window hash; ARGV limit, window_ms, want -> {granted, wait_ms}.
TAKE = (
    _NOW
    + _WINDOW
    + """
local key, limit, window, want = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local start, p, c, est = window_state(key, window, now)
local grant = math.min(want, math.floor(limit - est))
if grant <= 0 then return {0, window_wait(start, p, c, limit, window, now)} end
redis.call('HSET', key, 's', start, 'p', p, 'c', c + grant)
redis.call('PEXPIRE', key, window * 2)
return {grant, 0}
"""
)

#: KEYS ban key, handshake bucket hash (one hash tag); ARGV rate (tokens per second),
#: burst -> {ban_ms, wait_ms}: a banned address is answered without taking a token.
SCREEN = (
    _NOW
    + _BUCKET
    + """
local ban = redis.call('PTTL', KEYS[1])
if ban >= 0 then return {math.max(ban, 1), 0} end
return {0, bucket_take(KEYS[2], tonumber(ARGV[1]) / 1000, tonumber(ARGV[2]), now)}
"""
)

#: KEYS fail window hash, ban key, level key (one hash tag);
#: ARGV threshold, window_ms, base_ms, max_ms -> ban length in ms, or -1.
RECORD_FAILURE = (
    _NOW
    + _WINDOW
    + """
local threshold, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local base, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local start, p, c, est = window_state(KEYS[1], window, now)
redis.call('HSET', KEYS[1], 's', start, 'p', p, 'c', c + 1)
redis.call('PEXPIRE', KEYS[1], window * 2)
if est + 1 < threshold then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local level = tonumber(redis.call('GET', KEYS[3]) or '0')
local duration = math.floor(math.min(base * 2 ^ level, max))
redis.call('SET', KEYS[2], '1', 'PX', duration)
redis.call('SET', KEYS[3], level + 1, 'PX', duration + max * 2)
redis.call('DEL', KEYS[1])
return duration
"""
)

#: KEYS ban key; ARGV ms -> the ban's ms left afterwards. Sets a ban of ms unless a
#: longer one is already in force (an operator's ban never shortens an escalated one).
EXTEND_BAN = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return want
end
return left
"""
