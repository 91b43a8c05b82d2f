-- Start a fan-out run if none is in progress (or serve a result the caller may have).
-- KEYS[1] lock key, KEYS[2] fence counter, KEYS[3] result key (see complete.lua)
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms, ARGV[4] max cache age in ms (-1: none),
-- ARGV[5] how long ago (ms, at send time) the newest caller of this attempt called (0: none)
-- Returns {1, holder_value, fence}   acquired: the caller leads run `fence`
--         {0, holder_value, pttl_ms} busy: run in progress
--         {2, stored, age_ms}         a successful result no older than the max cache age
--         {3, stored, age_ms}         a result (success or failure) of a run that completed
--                                     after every caller of this attempt called: theirs
local max_age = tonumber(ARGV[4])
local called = tonumber(ARGV[5])
-- A stored result's age: complete.lua stored it with PX linger, so it is the linger
-- minus what is left. Returns the reply to serve, if any.
local function serve(stored)
  local ok, linger = string.match(stored, '^r1:(%d):(%d+):')
  if not ok then
    return nil
  end
  local age = tonumber(linger) - redis.call('PTTL', KEYS[3])
  -- Produced after the call (PTTL rounds down: one more ms keeps this conservative).
  if age + 1 < called then
    return {3, stored, age}
  end
  if ok == '1' and age <= max_age then
    return {2, stored, age}
  end
  return nil
end
local checked = false
if max_age >= 0 then
  -- A fresh enough cached result is served even while a new run is in progress.
  checked = true
  local stored = redis.call('GET', KEYS[3])
  if stored then
    local reply = serve(stored)
    if reply then
      return reply
    end
  end
end
local current = redis.call('GET', KEYS[1])
if current then
  -- A retry of an attempt that already succeeded (its reply was lost): same nonce.
  local fence, nonce = string.match(current, '^(%d+):([^:]*):')
  if nonce == ARGV[1] then
    return {1, current, tonumber(fence)}
  end
  -- A run in progress: follow it (it completes after every caller of this attempt called).
  return {0, current, redis.call('PTTL', KEYS[1])}
end
if not checked and called > 1 then
  local stored = redis.call('GET', KEYS[3])
  if stored then
    local reply = serve(stored)
    if reply then
      return reply
    end
  end
end
local fence = redis.call('INCR', KEYS[2])
local value = string.format('%d:%s:%s', fence, ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return {1, value, fence}
