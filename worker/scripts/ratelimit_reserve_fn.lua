-- ratelimit_reserve_fn: a fragment (included, never run alone) defining
--   fmt(x) -> x as text with 6 decimals
--   reserve(k, n, now, limit, window, margin, max_wait, first) -> ok, start, step
-- Included by ratelimit_reserve.lua and store_admit.lua.
-- KEYS: none of its own: k = {tat=, front=, pause=, others=} holds the brand's rate keys,
--       which the including script got through KEYS (ratelimit.reserve_keys() order).
-- ARGV: none of its own.
-- reserve takes the brand's next n slots if the first is within max_wait seconds (GCRA:
-- the next free slot is `tat`); `first` (a result already under way: its PATCH after a
-- not-ready GET, a re-try after a 401, one deferred by a 429 pause) takes its slots ahead
-- of the queue, paced among its kind by the front pointer (so a pause's end is not a herd),
-- and pushes the queue back by as many: the pace is kept, and the window guard
-- (ratelimit_take.lua) keeps the server's count. ok is 0 (nothing taken) when the first
-- slot is further than max_wait.

local function fmt(x) return string.format('%.6f', x) end
local function reserve(k, n, now, limit, window, margin, max_wait, first)
  local tat = tonumber(redis.call('GET', k.tat)) or 0
  local pause = tonumber(redis.call('GET', k.pause)) or 0
  local others = tonumber(redis.call('GET', k.others)) or 0
  local room = limit - others
  local cap = math.min(math.floor(room * (1 - margin)), room - 1)
  if cap < 1 then cap = 1 end
  local step = window / cap
  local start = math.max(tat, now, pause)
  local new_tat = start + n * step
  if first then
    local front = tonumber(redis.call('GET', k.front)) or 0
    start = math.max(now, pause, front)
    local new_front = start + n * step
    redis.call('SET', k.front, fmt(new_front),
      'PX', math.ceil((new_front - now + window) * 1000))
  elseif start - now > max_wait then
    return 0, start, step
  end
  redis.call('SET', k.tat, fmt(new_tat), 'PX', math.ceil((new_tat - now + window) * 1000))
  return 1, start, step
end
