-- ratelimit_pause: a 429 pauses the brand (every process) for `seconds`; its next slot is
-- after the pause.
-- KEYS: [1] rate pause, [2] rate tat (one brand).
-- ARGV: [1] now, [2] seconds.
-- Returns 1.

local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1])) or 0
if until_ > current then
  local ms = math.ceil(tonumber(ARGV[2]) * 1000)
  redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX', ms)
end
local tat = tonumber(redis.call('GET', KEYS[2])) or 0
if tat < until_ then
  local ms = math.ceil((until_ - tonumber(ARGV[1])) * 1000) + 60000
  redis.call('SET', KEYS[2], string.format('%.6f', until_), 'PX', ms)
end
return 1
