-- Start a fan-out run if none is in progress (or serve a result the caller may have).
-- KEYS[1] lock key, KEYS[2] result key (see complete.lua)
-- ARGV[1] nonce, ARGV[2] owner label, ARGV[3] ttl in ms, ARGV[4] max cache age in µs (-1: none),
-- ARGV[5] an upper bound on Redis's clock (µs) when the newest caller of this attempt called
-- (0: unknown), ARGV[6] how long ago (µs, at send time) that caller called
-- Every reply ends with Redis's clock (µs), so the client can bound it (backend/clock.rs).
-- Holder values, tokens and fences as in acquire.lua; a caller that finds a run in progress
-- follows it, so it marks the holder value as waited for.
-- Returns {1, token, fence, now, done}    acquired: the caller leads run `fence`; `done`: when
--                                          the stored result it did not serve completed (µs,
--                                          0: none read), for the client's miss detector
--         {0, holder_value, pttl_ms, now} busy: run in progress
--         {2, stored, age_us, now}         a successful result no older than the max cache age
--         {3, stored, age_us, now}         a result (success or failure) of a run that
--                                          completed after every caller of this attempt
--                                          called: theirs
local max_age = tonumber(ARGV[4])
local call_at = tonumber(ARGV[5])
local called = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- The reply serving a stored result (see complete.lua), if the caller may have it. Its
-- completion time is on Redis's clock, to the microsecond.
local last_done = 0
local function serve(stored)
  local ok, secs, us = string.match(stored, '^r2:(%d):(%d+)(%d%d%d%d%d%d):')
  if not ok then
    return nil
  end
  local done = tonumber(secs) * 1000000 + tonumber(us)
  last_done = done
  local age = now - done
  if age < 0 then
    return nil -- Redis's clock stepped back: the age is unknown
  end
  -- Completed after the newest call: either the client's bound on Redis's clock at the
  -- call says so, or the call is older than the result (the client measured `called`
  -- when it sent this, so the call is at least that long before now).
  if (call_at > 0 and done > call_at) or age < called then
    return {3, stored, age, now}
  end
  if ok == '1' and age <= max_age then
    return {2, stored, age, now}
  end
  return nil
end
-- The stored result's reply, if there is a result the caller may have.
local function stored_reply()
  local stored = redis.call('GET', KEYS[2])
  return stored and serve(stored)
end
local current = redis.call('GET', KEYS[1])
local f, nonce, ttl, waited, owner
if current then
  f, nonce, ttl, waited, owner = string.match(current, '^(%d+):([^:]*):(%d+):([01]):(.*)$')
  if nonce == ARGV[1] then
    -- A retry of an attempt that already succeeded (its reply was lost): same nonce. Checked
    -- before the cache, so a won lock is never left behind a cached reply.
    return {1, f .. ':' .. nonce, tonumber(f), now}
  end
end
-- A fresh enough cached result is served even while a new run is in progress; otherwise a
-- result that completed after the newest call, when no run is in progress.
if max_age >= 0 or (not current and (call_at > 0 or called > 0)) then
  local reply = stored_reply()
  if reply then
    return reply
  end
end
if current then
  -- A run in progress: follow it (it completes after every caller of this attempt called).
  if f and waited == '0' then
    current = f .. ':' .. nonce .. ':' .. ttl .. ':1:' .. owner
    redis.call('SET', KEYS[1], current, 'KEEPTTL')
  end
  return {0, current, redis.call('PTTL', KEYS[1]), now}
end
local fence = t[1] .. string.format('%06d', tonumber(t[2]))
local token = fence .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token .. ':' .. ARGV[3] .. ':0:' .. ARGV[2], 'PX', ARGV[3])
return {1, token, tonumber(fence), now, last_done}
