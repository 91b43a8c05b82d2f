-- Check that the caller may run every command herdlock's scripts run, on keys and a
-- channel under the herd's prefix: a script's `redis.call` runs with the caller's ACL
-- permissions, so running each command once here proves it. Used at connect when
-- `ACL DRYRUN` is not permitted. Harmless: it publishes one 'probe' notice on a channel no
-- herdlock waiter uses, and writes only its own two keys, each with a short TTL, and
-- deletes them again. A command whose harmlessness depends on another (INCR on a key that
-- has a TTL, ZADD on one that can get a TTL) is only tried when that other one ran.
-- KEYS[1] probe string key, KEYS[2] probe zset key
-- ARGV[1] probe channel
-- Returns {command, error, ...} for every refused command ({} when everything ran).
local refused = {}
local function try(command, ...)
  local reply = redis.pcall(command, ...)
  if type(reply) == 'table' and reply.err then
    table.insert(refused, string.lower(command))
    table.insert(refused, reply.err)
    return false
  end
  return true
end

try('PUBLISH', ARGV[1], 'probe')
try('TIME')
try('GET', KEYS[1])
try('PTTL', KEYS[1])
local set = try('SET', KEYS[1], '0', 'PX', 5000)
local expire = try('PEXPIRE', KEYS[1], 5000)
if set then
  try('INCR', KEYS[1])
  try('GETDEL', KEYS[1])
end
if expire and try('ZADD', KEYS[2], 0, 'probe') then
  try('PEXPIRE', KEYS[2], 5000)
end
try('ZCARD', KEYS[2])
try('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
try('ZRANGEBYSCORE', KEYS[2], '-inf', 0)
try('ZRANK', KEYS[2], 'probe')
try('ZSCORE', KEYS[2], 'probe')
try('ZREMRANGEBYSCORE', KEYS[2], '-inf', -1)
try('ZREM', KEYS[2], 'probe')
try('DEL', KEYS[1], KEYS[2])
return refused
