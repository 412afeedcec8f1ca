-- ratelimit_auth_hold: the API's answer to a /v2/auth call said the IP's minute is nearly
-- used up (AuthBudget.observe): no auth call of the deployment before `until`; a later hold
-- replaces an earlier one, never the reverse.
-- KEYS: [1] the auth hold (global).
-- ARGV: [1] until (unix s), [2] ms until then.
-- Returns 1 if the hold was set, else 0.

local current = tonumber(redis.call('GET', KEYS[1]))
if current and current >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
