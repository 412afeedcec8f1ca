-- web_login_attempt: may this login be tried now? If so, count it as a failure in advance
-- (web_login_take_back undoes that for a success), so a burst of guesses in parallel is
-- counted as it arrives.
-- KEYS: [1] the (user, client) counter, [2] the client's counter: hashes {failures, last}.
-- ARGV: [1] now (unix s), [2] free failures, [3] first lockout (s), [4] longest lockout (s),
--       [5] how long a run of failures is remembered after its lockout (s).
-- Returns {'0', previous last of KEYS[1], previous last of KEYS[2]} ('' where none) when the
-- attempt may go ahead (counted), else {seconds to wait} (strings).
local now, free = tonumber(ARGV[1]), tonumber(ARGV[2])
local base, longest, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function lockout(failures)
  if failures < free then
    return 0
  end
  return math.min(longest, base * 2 ^ math.min(failures - free, 16))
end
local wait = 0
for i = 1, 2 do
  local failures = tonumber(redis.call('HGET', KEYS[i], 'failures') or '0') or 0
  -- a 'last' ahead of this replica's clock (clocks differ) counts as now: no longer wait
  local last = math.min(now, tonumber(redis.call('HGET', KEYS[i], 'last') or '0') or 0)
  local locked = lockout(failures)
  if locked > 0 then
    wait = math.max(wait, last + locked - now)
  end
end
if wait > 0 then
  return {tostring(wait)}
end
local previous = {}
for i = 1, 2 do  -- a damaged count starts again from 0
  local failures = (tonumber(redis.call('HGET', KEYS[i], 'failures') or '0') or 0) + 1
  previous[i] = redis.call('HGET', KEYS[i], 'last') or ''
  redis.call('HSET', KEYS[i], 'failures', failures, 'last', ARGV[1])
  redis.call('EXPIRE', KEYS[i], math.ceil(window + lockout(failures)))
end
return {'0', previous[1], previous[2]}
