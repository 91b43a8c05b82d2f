-- Reset a held lock's TTL if the caller still holds it.
-- KEYS[1] lock key
-- ARGV[1] holder value, ARGV[2] ttl in ms
-- Returns 1 when extended, 0 when not the holder.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
