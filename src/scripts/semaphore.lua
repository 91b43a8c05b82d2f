-- Every semaphore step, in one script so the steps share their helpers.
-- KEYS[1] holders (zset: member -> lease expiry, ms of Redis TIME)
-- KEYS[2] queue (zset: member -> ticket), KEYS[3] queue liveness (zset: member -> expiry)
-- KEYS[4] ticket counter
-- ARGV[1] op, ARGV[2] member (`nonce:owner`), ARGV[3] permits, ARGV[4] lease ms,
-- ARGV[5] queue entry ttl ms, ARGV[6] notice channel
--
-- ops and replies:
--   try      {1, in_use, 0} admitted | {0, in_use, ms until the earliest lease ends (-1: none)}
--            (fair: only when nobody is queued ahead)
--   queue    like try, but a fair waiter: enqueue (or refresh) and admit in ticket order
--   release  1 released | 0 not held (expired)
--   extend   1 extended | 0 not held (expired or never)
--   leave    1 (a waiter gives up: its queue place, and a permit its cancelled attempt took)
--   status   {in_use, queued, member_1, remaining_ms_1, ...}
--
-- Scripts do not roll back, so a step publishes its notices before it changes anything
-- (a refused PUBLISH, a revoked channel permission, then leaves the step undone), and no
-- write can be refused: the housekeeping below is the first write, and Redis checks
-- `maxmemory` only at a script's first write. That housekeeping only drops what has
-- already expired, which every step does first anyway.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, member = ARGV[1], ARGV[2]
local permits, lease, qttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local channel = ARGV[6]

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
end

-- Keep every key only as long as something in it can live.
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

local function soonest()
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2]) - now
  end
  return -1
end

-- Tell the waiters at the head of the queue, as many as there will be free permits, to
-- re-check. Called before the step's writes: `change` is how many holders the step will
-- add (1) or remove (-1), and `leaving` a member it will take out of the queue.
local function wake_heads(change, leaving)
  local free = permits - redis.call('ZCARD', KEYS[1]) - change
  if free <= 0 then
    return
  end
  -- One more than needed, in case `leaving` is among them.
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, free)) do
    if free > 0 and m ~= leaving then
      redis.call('PUBLISH', channel, 'wake:' .. m)
      free = free - 1
    end
  end
end

local function admit()
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZADD', KEYS[1], now + lease, member)
  keep(KEYS[1], lease)
  return {1, redis.call('ZCARD', KEYS[1]), 0}
end

if op == 'try' or op == 'queue' then
  if redis.call('ZSCORE', KEYS[1], member) then
    -- A retry of an attempt that already succeeded (its reply was lost).
    return {1, redis.call('ZCARD', KEYS[1]), 0}
  end
  local in_use = redis.call('ZCARD', KEYS[1])
  local free = permits - in_use
  local rank = redis.call('ZRANK', KEYS[2], member)
  if op == 'try' then
    local queued = redis.call('ZCARD', KEYS[2])
    if free > 0 and (queued == 0 or rank == 0) then
      return admit()
    end
    return {0, in_use, soonest()}
  end
  -- A new member's ticket is the highest yet (INCR), so its place is the end of the queue.
  if (rank or redis.call('ZCARD', KEYS[2])) < free then
    wake_heads(1, member)
    return admit()
  end
  if not rank then
    local ticket = redis.call('INCR', KEYS[4])
    redis.call('ZADD', KEYS[2], ticket, member)
  end
  redis.call('ZADD', KEYS[3], now + qttl, member)
  keep(KEYS[2], qttl)
  keep(KEYS[3], qttl)
  keep(KEYS[4], qttl)
  return {0, in_use, soonest()}
elseif op == 'release' then
  if not redis.call('ZSCORE', KEYS[1], member) then
    return 0
  end
  redis.call('PUBLISH', channel, 'released')
  wake_heads(-1, nil)
  return redis.call('ZREM', KEYS[1], member)
elseif op == 'extend' then
  if not redis.call('ZSCORE', KEYS[1], member) then
    return 0
  end
  redis.call('ZADD', KEYS[1], 'XX', now + lease, member)
  keep(KEYS[1], lease)
  return 1
elseif op == 'leave' then
  local queued = redis.call('ZSCORE', KEYS[2], member)
  -- An attempt cancelled while its step was in flight may have been admitted with nobody
  -- to own the permit: give it back (each attempt has its own member).
  local held = redis.call('ZSCORE', KEYS[1], member)
  if held then
    redis.call('PUBLISH', channel, 'released')
  end
  if queued or held then
    wake_heads(held and -1 or 0, member)
  end
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZREM', KEYS[1], member)
  return 1
elseif op == 'status' then
  local out = {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
  local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    table.insert(out, all[i])
    table.insert(out, tonumber(all[i + 1]) - now)
  end
  return out
end
return redis.error_reply('unknown semaphore op')
