-- store_renew: renew a running lease, if the run is still the result's current dispatch.
-- KEYS: [1] result hash, [2] schedule.
-- ARGV: [1] rid, [2] dispatch, [3] lease-until.
-- Returns 0 if superseded, else 1 + whether the score changed (1 or 2).

if redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[2] then return 0 end
return redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[3], ARGV[1]) + 1
