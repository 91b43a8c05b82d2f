-- Acquire a lock if it is free.
-- KEYS[1] lock key
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms, ARGV[4] 1 if the caller will wait
-- Returns {1, token, fence} when acquired, {0, holder_value, pttl_ms} when busy.
--
-- The holder value is '<fence>:<nonce>:<ttl ms>:<waited 0|1>:<owner>'; its first two fields,
-- '<fence>:<nonce>', are the holder's token, which release, extend and complete compare.
-- The fence is Redis TIME in µs: strictly increasing per name as long as Redis's clock
-- moves forward (two acquisitions of one name are always at least one script apart), with
-- no counter key that would have to live forever. A caller that will wait marks the value
-- (`waited` = 1), so that a release publishes a notice only when someone listens.
-- Commands on the uncontended path: TIME, SET.
local t = redis.call('TIME')
local fence = t[1] .. string.format('%06d', tonumber(t[2]))
local token = fence .. ':' .. ARGV[1]
local value = token .. ':' .. ARGV[3] .. ':0:' .. ARGV[2]
local old = redis.call('SET', KEYS[1], value, 'NX', 'GET', 'PX', ARGV[3])
if not old then
  return {1, token, tonumber(fence)}
end
local f, nonce, ttl, waited, owner = string.match(old, '^(%d+):([^:]*):(%d+):([01]):(.*)$')
if nonce == ARGV[1] then
  -- A retry of an attempt that already succeeded (its reply was lost): same nonce.
  return {1, f .. ':' .. nonce, tonumber(f)}
end
if f and ARGV[4] == '1' and waited == '0' then
  redis.call('SET', KEYS[1], f .. ':' .. nonce .. ':' .. ttl .. ':1:' .. owner, 'KEEPTTL')
end
return {0, old, redis.call('PTTL', KEYS[1])}
