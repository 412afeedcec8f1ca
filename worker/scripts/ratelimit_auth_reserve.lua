-- ratelimit_auth_reserve: the deployment's /v2/auth budget (AuthBudget.reserve). GCRA with
-- a burst tolerance: a call may go up to `tolerance` seconds ahead of the steady pace.
-- KEYS: [1] the auth TAT (global).
-- ARGV: [1] now, [2] step, [3] tolerance, [4] max_wait.
-- Returns {1, when it may go} (slot taken) or {0, when it could} (nothing taken).

local now, step, tol = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local base = math.max(tat, now)
local go = math.max(now, base - tol)
if go - now > tonumber(ARGV[4]) then return {0, string.format('%.6f', go)} end
local ms = math.ceil((base + step - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.6f', base + step), 'PX', ms)
return {1, string.format('%.6f', go)}
