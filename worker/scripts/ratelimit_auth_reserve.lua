-- ratelimit_auth_reserve: the deployment's /v2/auth budget (AuthBudget.reserve): at most
-- `cap` calls in any `window` seconds (the API counts a sliding minute per IP), booked in a
-- log; a call that does not fit goes when the call `cap` places before it leaves the
-- window (it is booked ahead, so the ones after it queue behind). Nothing goes before the
-- hold (the API said the IP's minute is nearly used up).
-- KEYS: [1] the auth call log (zset, global), [2] the auth hold (global).
-- ARGV: [1] now, [2] window, [3] cap, [4] max_wait, [5] member (unique per call).
-- Returns {1, when it may go} (booked) or {0, when it could} (nothing booked).

local now, window, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local go = now
local n = redis.call('ZCARD', KEYS[1])
if n >= cap then
  local leaving = redis.call('ZRANGE', KEYS[1], n - cap, n - cap, 'WITHSCORES')
  go = math.max(now, tonumber(leaving[2]) + window)
end
local hold = tonumber(redis.call('GET', KEYS[2]))
if hold and hold > go then go = hold end
if go - now > tonumber(ARGV[4]) then return {0, string.format('%.6f', go)} end
redis.call('ZADD', KEYS[1], go, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil((go - now + window) * 1000))
return {1, string.format('%.6f', go)}
