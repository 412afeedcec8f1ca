-- breaker_allow: may a call of the brand go now? Closed: yes. Open: not before `until`;
-- after it (half-open) one process takes the probe lock and makes the single probe call.
-- The breaker hash's fields (keys.BREAKER_*): state ('open' | 'closed'), failures, until,
-- cooldown, opened_at.
-- KEYS: [1] breaker hash, [2] probe lock (one brand).
-- ARGV: [1] now, [2] probe timeout ms, [3] owner (of the probe lock).
-- Returns {'closed'}, {'probe'} or {'open', retry at}.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'open' then return {'closed'} end
local now = tonumber(ARGV[1])
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until'))
if now < until_ then return {'open', tostring(until_)} end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return {'probe'} end
return {'open', tostring(now + 1)}
