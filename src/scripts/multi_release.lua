-- Release several locks, each only if the caller still holds it.
-- KEYS: lock_1 .. lock_n
-- ARGV: holder_value_1 .. holder_value_n, channel_1 .. channel_n
-- Returns {released_1, ..., released_n} (1 released, 0 no longer held by the caller).
-- Every notice goes out before the first delete: a refused PUBLISH (a revoked channel
-- permission) leaves every lock held, and a DEL cannot be refused.
local n = #KEYS
local out = {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('PUBLISH', ARGV[n + i], 'released')
    out[i] = 1
  else
    out[i] = 0
  end
end
for i = 1, n do
  if out[i] == 1 then
    redis.call('DEL', KEYS[i])
  end
end
return out
