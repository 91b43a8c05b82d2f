-- Finish a fan-out run: if the caller still holds the lock, store the result envelope
-- (with its completion time from Redis TIME) for a short linger, publish it, and release.
-- KEYS[1] lock key, KEYS[2] result hash
-- ARGV[1] holder value, ARGV[2] envelope, ARGV[3] linger in ms, ARGV[4] '1' if the run
-- succeeded, ARGV[5] notice channel
-- Returns 1 when completed, 0 when the caller no longer holds the lock (nothing written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'env', ARGV[2], 'at', now, 'ok', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
