-- store_fence_fn: a fragment (included, never run alone) defining
--   fence_check(result, lock, token, dispatch) -> 'ok' | 'superseded' | 'lock_lost'
--   fence_extend(lock, lock_ms, schedule, rid, lease_until)
-- Included by store_fence.lua and gate_check.lua.
-- KEYS: none of its own: `result` (the result hash), `lock` (the receipt lock) and
--       `schedule` are keys the including script got through KEYS.
-- ARGV: none of its own.
-- The fence right before a request: this run must still be the result's current dispatch
-- and hold the receipt's lock (a fencing check); then both are extended.

local function fence_check(result, lock, token, dispatch)
  if redis.call('HGET', result, 'dispatch') ~= dispatch then return 'superseded' end
  if redis.call('GET', lock) ~= token then return 'lock_lost' end
  return 'ok'
end

local function fence_extend(lock, lock_ms, schedule, rid, lease_until)
  redis.call('PEXPIRE', lock, lock_ms)
  redis.call('ZADD', schedule, 'XX', lease_until, rid)
end
