-- Extend several locks: all of them, or none. If any is no longer held by the caller, the
-- ones it still holds are released (and their waiters woken) and the lost ones are named.
-- KEYS: lock_1 .. lock_n
-- ARGV: holder_value_1 .. holder_value_n, channel_1 .. channel_n, ttl in ms
-- Returns {} when all were extended, else {index_of_lost_key, ...}.
-- When releasing, every notice goes out before the first delete (see multi_release.lua).
local n = #KEYS
local lost = {}
local held = {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    table.insert(held, i)
  else
    table.insert(lost, i)
  end
end
if #lost == 0 then
  for i = 1, n do
    redis.call('PEXPIRE', KEYS[i], ARGV[2 * n + 1])
  end
  return {}
end
for _, i in ipairs(held) do
  redis.call('PUBLISH', ARGV[n + i], 'released')
end
for _, i in ipairs(held) do
  redis.call('DEL', KEYS[i])
end
return lost
