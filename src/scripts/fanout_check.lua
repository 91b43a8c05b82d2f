-- Read a fan-out run's state: holder, remaining TTL and the last stored result.
-- KEYS[1] lock key, KEYS[2] result key
-- Returns {holder_value or '', pttl_ms, stored result or ''} (the stored result as
-- complete.lua wrote it, header included).
local holder = redis.call('GET', KEYS[1]) or ''
local stored = redis.call('GET', KEYS[2]) or ''
return {holder, redis.call('PTTL', KEYS[1]), stored}
