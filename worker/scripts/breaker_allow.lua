-- breaker_allow: may a call of the brand go now? See breaker_allow_fn.lua.
-- KEYS: [1] breaker hash, [2] probe lock (one brand).
-- ARGV: [1] now, [2] probe timeout ms, [3] owner (of the probe lock).
-- Returns {'closed'}, {'probe'} or {'open', retry at}.

-- #include breaker_allow_fn.lua
return breaker_allow(KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2], ARGV[3])
