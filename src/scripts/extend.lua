-- Reset a held lock's TTL if the caller still holds it.
-- KEYS[1] lock key
-- ARGV[1] holder token '<fence>:<nonce>', ARGV[2] ttl in ms
-- Returns 1 when extended, 0 when not the holder.
-- The holder value records the TTL (release.lua needs it); a new TTL rewrites it.
local prefix = ARGV[1] .. ':'
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #prefix) ~= prefix then
  return 0
end
local ttl, rest = string.match(v, '^%d+:[^:]*:(%d+):(.*)$')
if ttl == ARGV[2] or not rest then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], prefix .. ARGV[2] .. ':' .. rest, 'PX', ARGV[2])
end
return 1
