-- gate_record: after a receipt request was answered (or not), what it tells the brand's
-- budget and its circuit, in one step (worker/gate.py): others' use of the budget from
-- RateLimit-Remaining (when the answer had it), then the call's outcome for the breaker.
-- KEYS: [1] rate calls, [2] rate others, [3] breaker hash, [4] probe lock (one brand).
-- ARGV: [1] sent (unix s), [2] window, [3] limit, [4] remaining ('' if unknown),
--       [5] breaker: '1' success, '0' failure, '' neither (the circuit is left as it is),
--       [6] now, [7] threshold, [8] base cool-down, [9] max cool-down, [10] probe (1/0).
-- Returns {transition, cool-down}: transition '' (none), 'opened', 'reopened' or 'closed'.

-- #include ratelimit_observe_fn.lua
-- #include breaker_record_fn.lua

if ARGV[4] ~= '' then
  observe(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4]))
end
if ARGV[5] == '' then return {'', '0'} end
return breaker_record(KEYS[3], KEYS[4], ARGV[5] == '1', tonumber(ARGV[6]), ARGV[7], ARGV[8],
  ARGV[9], ARGV[10] == '1')
