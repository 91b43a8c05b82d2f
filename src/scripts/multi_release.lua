-- Release several locks, each only if the caller still holds it.
-- KEYS: lock_1 .. lock_n
-- ARGV: token_1 .. token_n ('<fence>:<nonce>'), channel_1 .. channel_n
-- Returns {released_1, ..., released_n} (1 released, 0 no longer held by the caller).
-- As release.lua: GETDEL, put back what was someone else's, publish only for a marked
-- value; if a PUBLISH is refused, every lock is put back and the error returned.
local n = #KEYS
local out, taken = {}, {}
for i = 1, n do
  local prefix = ARGV[i] .. ':'
  local v = redis.call('GETDEL', KEYS[i])
  out[i] = 0
  if v then
    local ttl = string.match(v, '^%d+:[^:]*:(%d+):') or 60000
    if string.sub(v, 1, #prefix) ~= prefix then
      redis.call('SET', KEYS[i], v, 'PX', ttl)
    else
      out[i] = 1
      taken[i] = {v, ttl}
    end
  end
end
for i = 1, n do
  local held = taken[i]
  if held and string.match(held[1], '^%d+:[^:]*:%d+:1:') then
    local published = redis.pcall('PUBLISH', ARGV[n + i], 'released')
    if type(published) == 'table' and published.err then
      for j = 1, n do
        if taken[j] then
          redis.call('SET', KEYS[j], taken[j][1], 'PX', taken[j][2])
        end
      end
      return published
    end
  end
end
return out
