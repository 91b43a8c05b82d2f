-- Read a fan-out run's state: holder, remaining TTL and the last stored result.
-- KEYS[1] lock key, KEYS[2] result hash
-- Returns {holder_value or '', pttl_ms, envelope or ''}.
local holder = redis.call('GET', KEYS[1]) or ''
local env = redis.call('HGET', KEYS[2], 'env') or ''
return {holder, redis.call('PTTL', KEYS[1]), env}
