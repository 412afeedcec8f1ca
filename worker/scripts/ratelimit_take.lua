-- ratelimit_take: the call about to go, counted in our log of the window if ours + others + 1
-- leaves one call spare (our clock and the server's see the window's edges a few ms apart).
-- KEYS: [1] rate calls, [2] rate others (one brand).
-- ARGV: [1] now, [2] window, [3] limit, [4] member (unique per call).
-- Returns {1, now} if it may go, else {0, when a call leaves the window}.

local calls = KEYS[1]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window)
local ours = redis.call('ZCARD', calls)
local others = tonumber(redis.call('GET', KEYS[2])) or 0
if ours + others + 1 > tonumber(ARGV[3]) - 1 then
  local oldest = redis.call('ZRANGE', calls, 0, 0, 'WITHSCORES')
  local free_at = now + 1
  if oldest[2] then free_at = tonumber(oldest[2]) + window end
  return {0, string.format('%.6f', free_at)}
end
redis.call('ZADD', calls, now, ARGV[4])
redis.call('PEXPIRE', calls, math.ceil(window * 1000))
return {1, ARGV[1]}
