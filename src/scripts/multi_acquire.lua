-- Acquire several locks at once: all of them, or none.
-- KEYS: lock_1 .. lock_n
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms, ARGV[4] 1 if the caller will wait
-- Returns {1, {token_1, ...}} when all were acquired,
--         {0, {index, holder_value, pttl_ms, ...}} naming every key held by someone else
--         (nothing is left changed, except that a waiting caller marks the held ones).
-- Holder values and fences as in acquire.lua: all keys of one acquisition share a fence.
local t = redis.call('TIME')
local fence = t[1] .. string.format('%06d', tonumber(t[2]))
local value = fence .. ':' .. ARGV[1] .. ':' .. ARGV[3] .. ':0:' .. ARGV[2]
local tokens, taken, busy = {}, {}, {}
for i = 1, #KEYS do
  local old = redis.call('SET', KEYS[i], value, 'NX', 'GET', 'PX', ARGV[3])
  if not old then
    tokens[i] = fence .. ':' .. ARGV[1]
    table.insert(taken, i)
  else
    local f, nonce, ttl, waited, owner = string.match(old, '^(%d+):([^:]*):(%d+):([01]):(.*)$')
    if nonce == ARGV[1] then
      -- This very attempt, retried after a lost reply.
      tokens[i] = f .. ':' .. nonce
    else
      if f and ARGV[4] == '1' and waited == '0' then
        old = f .. ':' .. nonce .. ':' .. ttl .. ':1:' .. owner
        redis.call('SET', KEYS[i], old, 'KEEPTTL')
      end
      table.insert(busy, i)
      table.insert(busy, old)
      table.insert(busy, redis.call('PTTL', KEYS[i]))
    end
  end
end
if #busy > 0 then
  for _, i in ipairs(taken) do
    redis.call('DEL', KEYS[i])
  end
  return {0, busy}
end
return {1, tokens}
