-- breaker_record: the outcome of a call of the brand; see breaker_record_fn.lua.
-- KEYS: [1] breaker hash, [2] probe lock (one brand).
-- ARGV: [1] ok (1/0), [2] now, [3] threshold, [4] base cool-down, [5] max cool-down,
--       [6] probe (1/0: this call was the half-open probe).
-- Returns {transition, cool-down}: transition '' (none), 'opened', 'reopened' or 'closed'.

-- #include breaker_record_fn.lua
return breaker_record(KEYS[1], KEYS[2], ARGV[1] == '1', tonumber(ARGV[2]), ARGV[3], ARGV[4],
  ARGV[5], ARGV[6] == '1')
