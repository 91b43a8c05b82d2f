-- Finish a fan-out run: if the caller still holds the lock, store the result for a short
-- linger, publish its envelope, and release.
-- KEYS[1] lock key, KEYS[2] result key
-- ARGV[1] holder value, ARGV[2] envelope, ARGV[3] linger in ms, ARGV[4] notice channel,
-- ARGV[5] 1 when the run succeeded, else 0
-- Returns 1 when completed, 0 when the caller no longer holds the lock (nothing written).
-- The stored value is 'r2:<ok 0|1>:<completed at, µs of Redis TIME>:' .. envelope, so a
-- later acquire can tell to the microsecond whether the run completed after a caller
-- called (fanout_acquire.lua).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local header = string.format('r2:%s:%s%06d:', ARGV[5], t[1], tonumber(t[2]))
redis.call('SET', KEYS[2], header .. ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
