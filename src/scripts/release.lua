-- Release a lock if the caller still holds it.
-- KEYS[1] lock key
-- ARGV[1] holder value, ARGV[2] grace in ms (0: delete now), ARGV[3] notice channel
-- Returns 1 when released (or put into its grace period), 0 when not the holder.
-- Scripts do not roll back: the notice goes out before the delete, so a refused PUBLISH
-- (a revoked channel permission) leaves the lock held, and nothing after it can fail.
-- Nobody sees the notice before the script ends, so the order is invisible otherwise.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local grace = tonumber(ARGV[2])
if grace > 0 then
  redis.call('PEXPIRE', KEYS[1], grace)
else
  redis.call('PUBLISH', ARGV[3], 'released')
  redis.call('DEL', KEYS[1])
end
return 1
