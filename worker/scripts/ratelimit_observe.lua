-- ratelimit_observe: after a response, learn other clients' use of the brand's budget:
-- others = limit - remaining - ours, where ours = our calls the server had counted when it
-- answered (those sent up to this one). Kept one window; a larger estimate replaces it.
-- KEYS: [1] rate calls, [2] rate others (one brand).
-- ARGV: [1] sent (unix s), [2] window, [3] limit, [4] remaining.
-- Returns the estimate.

local sent, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local ours = redis.call('ZCOUNT', KEYS[1], sent - window, sent)
local others = tonumber(ARGV[3]) - tonumber(ARGV[4]) - ours
local current = tonumber(redis.call('GET', KEYS[2])) or 0
if others > current or (others > 0 and redis.call('PTTL', KEYS[2]) < 0) then
  redis.call('SET', KEYS[2], others, 'PX', math.ceil(window * 1000))
end
return others
