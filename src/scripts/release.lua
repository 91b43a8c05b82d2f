-- Release a lock if the caller still holds it.
-- KEYS[1] lock key
-- ARGV[1] holder token '<fence>:<nonce>', ARGV[2] grace in ms (0: delete now), ARGV[3] notice channel
-- Returns 1 when released (or put into its grace period), 0 when not the holder.
--
-- Commands on the uncontended path: GETDEL. The value is taken and deleted in one command;
-- if it was someone else's, it is put back with its TTL in full (never a shorter life than
-- it had: its holder's own deadline is within one TTL of its last renewal). A notice is
-- published only when a waiter marked the value (acquire.lua). Scripts do not roll back:
-- if that PUBLISH is refused (a revoked channel permission), the lock is put back as it
-- was and the error returned, so nothing is half done.
local prefix = ARGV[1] .. ':'
local grace = tonumber(ARGV[2])
if grace > 0 then
  local v = redis.call('GET', KEYS[1])
  if not v or string.sub(v, 1, #prefix) ~= prefix then
    return 0
  end
  -- The value's TTL becomes the grace, so a stale release that puts it back (see below)
  -- does not give it a longer life than it has.
  local rest = string.match(v, '^%d+:[^:]*:%d+:(.*)$')
  if rest then
    redis.call('SET', KEYS[1], prefix .. ARGV[2] .. ':' .. rest, 'PX', grace)
  else
    redis.call('PEXPIRE', KEYS[1], grace)
  end
  return 1
end
local v = redis.call('GETDEL', KEYS[1])
if not v then
  return 0
end
if string.sub(v, 1, #prefix) ~= prefix then
  redis.call('SET', KEYS[1], v, 'PX', string.match(v, '^%d+:[^:]*:(%d+):') or 60000)
  return 0
end
-- After the token: '<ttl ms>:<waited 0|1>:'; byte 49 is '1'.
local colon = string.find(v, ':', #prefix + 1, true)
if colon and string.byte(v, colon + 1) == 49 then
  local published = redis.pcall('PUBLISH', ARGV[3], 'released')
  if type(published) == 'table' and published.err then
    redis.call('SET', KEYS[1], v, 'PX', string.sub(v, #prefix + 1, colon - 1))
    return published
  end
end
return 1
