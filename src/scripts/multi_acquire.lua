-- Acquire several locks at once: all of them, or none.
-- KEYS: lock_1, fence_1, lock_2, fence_2, ... (one pair per key)
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms
-- Returns {1, {holder_value_1, ...}} when all were acquired,
--         {0, {index, holder_value, pttl_ms, ...}} naming every key held by someone else.
local n = #KEYS / 2
local busy = {}
for i = 1, n do
  local current = redis.call('GET', KEYS[2 * i - 1])
  if current then
    local _, nonce = string.match(current, '^(%d+):([^:]*):')
    -- A holder with our nonce is this very attempt, retried after a lost reply.
    if nonce ~= ARGV[1] then
      table.insert(busy, i)
      table.insert(busy, current)
      table.insert(busy, redis.call('PTTL', KEYS[2 * i - 1]))
    end
  end
end
if #busy > 0 then
  return {0, busy}
end
local values = {}
for i = 1, n do
  local current = redis.call('GET', KEYS[2 * i - 1])
  if current then
    table.insert(values, current)
  else
    local fence = redis.call('INCR', KEYS[2 * i])
    local value = string.format('%d:%s:%s', fence, ARGV[1], ARGV[2])
    redis.call('SET', KEYS[2 * i - 1], value, 'PX', ARGV[3])
    table.insert(values, value)
  end
end
return {1, values}
