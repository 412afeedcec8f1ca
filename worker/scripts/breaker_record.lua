-- breaker_record: the outcome of a call of the brand. A success closes the circuit (the
-- hash and the probe lock are deleted); `threshold` consecutive failures open it for `base`
-- seconds; a failed probe opens it again with the cool-down doubled, up to `max`.
-- The breaker hash's fields (keys.BREAKER_*): state ('open' | 'closed'), failures, until,
-- cooldown, opened_at.
-- KEYS: [1] breaker hash, [2] probe lock (one brand).
-- ARGV: [1] ok (1/0), [2] now, [3] threshold, [4] base cool-down, [5] max cool-down,
--       [6] probe (1/0: this call was the half-open probe).
-- Returns {transition, cool-down}: transition '' (none), 'opened', 'reopened' or 'closed'.

local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[1] == '1' then
  if state then redis.call('DEL', KEYS[1], KEYS[2]) end
  if state == 'open' then return {'closed', '0'} end
  return {'', '0'}
end
local now = tonumber(ARGV[2])
if state == 'open' then
  if ARGV[6] ~= '1' then return {'', '0'} end  -- a call that was in flight when it opened
  local previous = tonumber(redis.call('HGET', KEYS[1], 'cooldown'))
  local cooldown = math.min(tonumber(ARGV[5]), previous * 2)
  redis.call('HSET', KEYS[1], 'cooldown', cooldown, 'until', string.format('%.6f', now + cooldown))
  redis.call('HINCRBY', KEYS[1], 'failures', 1)
  redis.call('DEL', KEYS[2])
  return {'reopened', tostring(cooldown)}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'cooldown', ARGV[4],
    'until', string.format('%.6f', now + tonumber(ARGV[4])),
    'opened_at', string.format('%.6f', now))
  return {'opened', ARGV[4]}
end
redis.call('HSET', KEYS[1], 'state', 'closed')
return {'', '0'}
