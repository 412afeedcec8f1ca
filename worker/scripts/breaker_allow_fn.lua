-- breaker_allow_fn: a fragment (included, never run alone) defining
--   breaker_allow(hash, probe_lock, now, probe_ms, owner) -> {'closed'} | {'probe'} | {'open', at}
-- Included by breaker_allow.lua and gate_check.lua.
-- KEYS: none of its own: `hash` and `probe_lock` are the brand's breaker keys, which the
--       including script got through KEYS.
-- ARGV: none of its own.
-- May a call of the brand go now? Closed: yes. Open: not before `until`; after it
-- (half-open) one process takes the probe lock and makes the single probe call. A hash
-- without `until` (damaged) is half-open: it probes.
-- The breaker hash's fields (keys.BREAKER_*): state ('open' | 'closed'), failures, until,
-- cooldown, opened_at.

local function breaker_allow(hash, probe_lock, now, probe_ms, owner)
  if redis.call('HGET', hash, 'state') ~= 'open' then return {'closed'} end
  local until_ = tonumber(redis.call('HGET', hash, 'until'))
  if until_ and now < until_ then return {'open', tostring(until_)} end
  if redis.call('SET', probe_lock, owner, 'NX', 'PX', probe_ms) then return {'probe'} end
  return {'open', tostring(now + 1)}
end
