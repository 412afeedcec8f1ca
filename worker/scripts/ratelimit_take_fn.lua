-- ratelimit_take_fn: a fragment (included, never run alone) defining
--   take(calls, others, now, window, limit, member) -> true | false, when a call leaves
-- Included by ratelimit_take.lua and gate_check.lua.
-- KEYS: none of its own: `calls` and `others` are the brand's rate calls and rate others
--       keys, which the including script got through KEYS.
-- ARGV: none of its own.
-- The call about to go, counted in our log of the window if ours + others + 1 leaves one
-- call spare (our clock and the server's see the window's edges a few ms apart).

local function take(calls, others_key, now, window, limit, member)
  redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window)
  local ours = redis.call('ZCARD', calls)
  local others = tonumber(redis.call('GET', others_key)) or 0
  if ours + others + 1 > limit - 1 then
    local oldest = redis.call('ZRANGE', calls, 0, 0, 'WITHSCORES')
    local free_at = now + 1
    if oldest[2] then free_at = tonumber(oldest[2]) + window end
    return false, string.format('%.6f', free_at)
  end
  redis.call('ZADD', calls, now, member)
  redis.call('PEXPIRE', calls, math.ceil(window * 1000))
  return true, nil
end
