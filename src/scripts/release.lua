-- Release a lock if the caller still holds it.
-- KEYS[1] lock key
-- ARGV[1] holder value, ARGV[2] grace in ms (0: delete now), ARGV[3] notice channel
-- Returns 1 when released (or put into its grace period), 0 when not the holder.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local grace = tonumber(ARGV[2])
if grace > 0 then
  redis.call('PEXPIRE', KEYS[1], grace)
else
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], 'released')
end
return 1
