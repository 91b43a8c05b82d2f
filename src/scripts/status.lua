-- Read a lock's holder, remaining TTL and last fence in one consistent snapshot.
-- KEYS[1] lock key, KEYS[2] fence counter
-- Returns {holder_value or '', pttl_ms, last_fence or '0'}.
local holder = redis.call('GET', KEYS[1]) or ''
local fence = redis.call('GET', KEYS[2]) or '0'
return {holder, redis.call('PTTL', KEYS[1]), fence}
