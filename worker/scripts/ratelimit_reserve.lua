-- ratelimit_reserve: take one brand's next n call slots (BrandBudget.reserve); see
-- ratelimit_reserve_fn.lua.
-- KEYS: [1] rate tat, [2] rate front, [3] rate pause, [4] rate others (one brand).
-- ARGV: [1] n, [2] now, [3] limit, [4] window, [5] margin, [6] max_wait, [7] first (1/0).
-- Returns {ok (1/0), start, step}.

-- #include ratelimit_reserve_fn.lua
local k = {tat = KEYS[1], front = KEYS[2], pause = KEYS[3], others = KEYS[4]}
local ok, start, step = reserve(k, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1')
return {ok, fmt(start), fmt(step)}
