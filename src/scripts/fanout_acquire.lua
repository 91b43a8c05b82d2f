-- Start a fan-out run if none is in progress (or serve a fresh enough cached result).
-- KEYS[1] lock key, KEYS[2] fence counter, KEYS[3] result key (see complete.lua)
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms, ARGV[4] max cache age in ms (-1: none)
-- Returns {1, holder_value, fence}   acquired: the caller leads run `fence`
--         {0, holder_value, pttl_ms} busy: run in progress
--         {2, stored, age_ms}         a successful result no older than the max cache age
local max_age = tonumber(ARGV[4])
if max_age >= 0 then
  local stored = redis.call('GET', KEYS[3])
  if stored then
    -- complete.lua stored it with PX linger: its age is the linger minus what is left.
    local ok, linger = string.match(stored, '^r1:(%d):(%d+):')
    if ok == '1' then
      local age = tonumber(linger) - redis.call('PTTL', KEYS[3])
      if age <= max_age then
        return {2, stored, age}
      end
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
  return {0, current, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
local value = string.format('%d:%s:%s', fence, ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return {1, value, fence}
