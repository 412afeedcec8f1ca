-- ratelimit_observe: after a response, learn other clients' use of the brand's budget; see
-- ratelimit_observe_fn.lua.
-- KEYS: [1] rate calls, [2] rate others (one brand).
-- ARGV: [1] sent (unix s), [2] window, [3] limit, [4] remaining.
-- Returns the estimate.

-- #include ratelimit_observe_fn.lua
return observe(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]))
