-- Extend several locks: all of them, or none. If any is no longer held by the caller, the
-- ones it still holds are released (and their waiters woken) and the lost ones are named.
-- KEYS: lock_1 .. lock_n
-- ARGV: token_1 .. token_n ('<fence>:<nonce>'), channel_1 .. channel_n, ttl in ms
-- Returns {} when all were extended, else {index_of_lost_key, ...}.
-- When releasing, every notice goes out before the first delete: a refused PUBLISH (a
-- revoked channel permission) leaves every lock held, and a DEL cannot be refused.
local n = #KEYS
local ttl = ARGV[2 * n + 1]
local lost, held, values = {}, {}, {}
for i = 1, n do
  local prefix = ARGV[i] .. ':'
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, #prefix) == prefix then
    table.insert(held, i)
    values[i] = v
  else
    table.insert(lost, i)
  end
end
if #lost == 0 then
  for i = 1, n do
    local old, rest = string.match(values[i], '^%d+:[^:]*:(%d+):(.*)$')
    if old == ttl or not rest then
      redis.call('PEXPIRE', KEYS[i], ttl)
    else
      redis.call('SET', KEYS[i], ARGV[i] .. ':' .. ttl .. ':' .. rest, 'PX', ttl)
    end
  end
  return {}
end
for _, i in ipairs(held) do
  if string.match(values[i], '^%d+:[^:]*:%d+:1:') then
    redis.call('PUBLISH', ARGV[n + i], 'released')
  end
end
for _, i in ipairs(held) do
  redis.call('DEL', KEYS[i])
end
return lost
