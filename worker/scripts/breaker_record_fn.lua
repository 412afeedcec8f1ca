-- breaker_record_fn: a fragment (included, never run alone) defining
--   breaker_record(hash, probe_lock, ok, now, threshold, base, max, probe) -> {transition, cool-down}
-- Included by breaker_record.lua and gate_record.lua.
-- KEYS: none of its own: `hash` and `probe_lock` are the brand's breaker keys, which the
--       including script got through KEYS.
-- ARGV: none of its own.
-- The outcome of a call of the brand. A success (`ok`) closes the circuit (the hash and the
-- probe lock are deleted); `threshold` consecutive failures open it for `base` seconds; a
-- failed probe opens it again with the cool-down doubled, up to `max`. Transition: ''
-- (none), 'opened', 'reopened' or 'closed'.
-- The breaker hash's fields (keys.BREAKER_*): state ('open' | 'closed'), failures, until,
-- cooldown, opened_at.

local function breaker_record(hash, probe_lock, ok, now, threshold, base, max, probe)
  local state = redis.call('HGET', hash, 'state')
  if ok then
    if state then redis.call('DEL', hash, probe_lock) end
    if state == 'open' then return {'closed', '0'} end
    return {'', '0'}
  end
  if state == 'open' then
    if not probe then return {'', '0'} end  -- a call that was in flight when it opened
    local previous = tonumber(redis.call('HGET', hash, 'cooldown')) or tonumber(base)
    local cooldown = math.min(tonumber(max), previous * 2)
    redis.call('HSET', hash, 'cooldown', cooldown, 'until', string.format('%.6f', now + cooldown))
    redis.call('HINCRBY', hash, 'failures', 1)
    redis.call('DEL', probe_lock)
    return {'reopened', tostring(cooldown)}
  end
  local failures = redis.call('HINCRBY', hash, 'failures', 1)
  if failures >= tonumber(threshold) then
    redis.call('HSET', hash, 'state', 'open', 'cooldown', base,
      'until', string.format('%.6f', now + tonumber(base)),
      'opened_at', string.format('%.6f', now))
    return {'opened', base}
  end
  redis.call('HSET', hash, 'state', 'closed')
  return {'', '0'}
end
