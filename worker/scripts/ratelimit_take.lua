-- ratelimit_take: the call about to go, counted in our log of the window if it leaves one
-- call spare; see ratelimit_take_fn.lua.
-- KEYS: [1] rate calls, [2] rate others (one brand).
-- ARGV: [1] now, [2] window, [3] limit, [4] member (unique per call).
-- Returns {1, now} if it may go, else {0, when a call leaves the window}.

-- #include ratelimit_take_fn.lua
local ok, free_at = take(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), ARGV[4])
if ok then return {1, ARGV[1]} end
return {0, free_at}
