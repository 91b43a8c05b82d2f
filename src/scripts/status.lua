-- Read a lock's holder and remaining TTL in one consistent snapshot.
-- KEYS[1] lock key
-- Returns {holder_value or '', pttl_ms}.
local holder = redis.call('GET', KEYS[1]) or ''
return {holder, redis.call('PTTL', KEYS[1])}
