-- ratelimit_observe_fn: a fragment (included, never run alone) defining
--   observe(calls, others, sent, window, limit, remaining) -> the estimate
-- Included by ratelimit_observe.lua and gate_record.lua.
-- KEYS: none of its own: `calls` and `others` are the brand's rate calls and rate others
--       keys, which the including script got through KEYS.
-- ARGV: none of its own.
-- After a response, learn other clients' use of the brand's budget: others = limit -
-- remaining - ours, where ours = our calls the server had counted when it answered (those
-- sent up to this one). Kept one window; a larger estimate replaces it. An estimate of one
-- call is taken for none: a call of ours sent just after this one, by another process, may
-- have reached the server first (measured: with 4 processes it shows up as 1 in most
-- windows, and planned one call short of the budget); the window guard's spare call covers
-- one call of others we do not count.

local function observe(calls, others_key, sent, window, limit, remaining)
  local ours = redis.call('ZCOUNT', calls, sent - window, sent)
  local others = limit - remaining - ours
  if others < 2 then others = 0 end
  local current = tonumber(redis.call('GET', others_key)) or 0
  if others > current or (others > 0 and redis.call('PTTL', others_key) < 0) then
    redis.call('SET', others_key, others, 'PX', math.ceil(window * 1000))
  end
  return others
end
