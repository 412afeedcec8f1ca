-- gate_check: right before a receipt request is sent, every check of it in one step
-- (worker/gate.py): this run is still the result's dispatch and holds the receipt lock
-- (the fence), the brand's circuit lets it call (or this run takes the half-open probe),
-- no 429 pause holds the brand, and the window guard counts it. Only when all pass are the
-- call counted and the lock and the lease extended; a refusal writes nothing but the
-- half-open probe lock, if it took one (the run lets it go: pipeline._drop_probe).
-- Crosses slots: the record and the schedule are global, the other keys the brand's.
-- KEYS: [1] result hash, [2] schedule, [3] receipt lock, [4] breaker hash, [5] probe lock,
--       [6] rate pause, [7] rate calls, [8] rate others.
-- ARGV: [1] now, [2] rid, [3] dispatch, [4] lock token, [5] lock ms, [6] lease-until,
--       [7] probe held (1/0), [8] probe timeout ms, [9] probe owner, [10] window,
--       [11] limit, [12] member (unique per call).
-- Returns {verdict, probe (1/0: this run holds the probe), at}: verdict 'ok', 'superseded',
-- 'lock_lost', 'open' (circuit; at = when to look again), 'paused' (at = its end) or
-- 'full' (the window; at = when a call leaves it).

-- #include breaker_allow_fn.lua
-- #include ratelimit_take_fn.lua
-- #include store_fence_fn.lua

local fenced = fence_check(KEYS[1], KEYS[3], ARGV[4], ARGV[3])
if fenced ~= 'ok' then return {fenced, ARGV[7], ''} end
local now = tonumber(ARGV[1])
local probe = ARGV[7]
if probe ~= '1' then
  local permit = breaker_allow(KEYS[4], KEYS[5], now, ARGV[8], ARGV[9])
  if permit[1] == 'open' then return {'open', '0', permit[2]} end
  if permit[1] == 'probe' then probe = '1' end
end
local paused = tonumber(redis.call('GET', KEYS[6]))
if paused and paused > now then return {'paused', probe, redis.call('GET', KEYS[6])} end
local ok, free_at = take(KEYS[7], KEYS[8], now, tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12])
if not ok then return {'full', probe, free_at} end
fence_extend(KEYS[3], ARGV[5], KEYS[2], ARGV[2], ARGV[6])
return {'ok', probe, ARGV[1]}
