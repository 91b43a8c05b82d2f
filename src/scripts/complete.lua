-- Finish a fan-out run: if the caller still holds the lock, store the result for a short
-- linger, publish its envelope, and release.
-- KEYS[1] lock key, KEYS[2] result key
-- ARGV[1] holder token '<fence>:<nonce>', ARGV[2] envelope, ARGV[3] linger in ms, ARGV[4] notice channel,
-- ARGV[5] 1 when the run succeeded, else 0
-- Returns 1 when completed, 0 when the caller no longer holds the lock (nothing written).
-- The stored value is 'r2:<ok 0|1>:<completed at, µs of Redis TIME>:' .. envelope, so a
-- later acquire can tell to the microsecond whether the run completed after a caller
-- called (fanout_acquire.lua).
--
-- Scripts do not roll back, so nothing may be refused once a step is done. Two things can
-- refuse: a missing channel permission (the PUBLISH) and `maxmemory` (Redis checks only a
-- script's first write). Hence the order: the first write rewrites the lock with its own
-- value and TTL (no change, but an out-of-memory refusal happens here, before anything),
-- then the PUBLISH (refused: nothing changed), then the result and the release, which can
-- no longer be refused. Nobody sees the notice before the script ends.
local prefix = ARGV[1] .. ':'
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #prefix) ~= prefix then
  return 0
end
redis.call('SET', KEYS[1], v, 'KEEPTTL')
redis.call('PUBLISH', ARGV[4], ARGV[2])
local t = redis.call('TIME')
local header = string.format('r2:%s:%s%06d:', ARGV[5], t[1], tonumber(t[2]))
redis.call('SET', KEYS[2], header .. ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
return 1
