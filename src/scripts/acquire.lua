-- Acquire a lock if it is free.
-- KEYS[1] lock key, KEYS[2] fence counter
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms
-- Returns {1, holder_value, fence} when acquired, {0, holder_value, pttl_ms} when busy.
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
