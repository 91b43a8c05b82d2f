-- Finish a fan-out run: if the caller still holds the lock, store the result for a short
-- linger, publish its envelope, and release.
-- KEYS[1] lock key, KEYS[2] result key
-- ARGV[1] holder value, ARGV[2] stored value ('r1:<ok 0|1>:<linger ms>:' .. envelope),
-- ARGV[3] linger in ms, ARGV[4] notice channel, ARGV[5] where the envelope starts in ARGV[2]
-- Returns 1 when completed, 0 when the caller no longer holds the lock (nothing written).
-- The linger in the stored value lets a cache read tell the result's age from its PTTL,
-- so no TIME call is needed here.
--
-- Scripts do not roll back, so nothing may be refused once a step is done. Two things can
-- refuse: a missing channel permission (the PUBLISH) and `maxmemory` (Redis checks only a
-- script's first write). Hence the order: the first write rewrites the lock with its own
-- value and TTL (no change, but an out-of-memory refusal happens here, before anything),
-- then the PUBLISH (refused: nothing changed), then the result and the release, which can
-- no longer be refused. Nobody sees the notice before the script ends.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
redis.call('PUBLISH', ARGV[4], string.sub(ARGV[2], tonumber(ARGV[5])))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
return 1
