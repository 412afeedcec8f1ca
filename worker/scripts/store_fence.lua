-- store_fence: right before a request is sent. This run must still be the result's current
-- dispatch and hold the receipt's lock (a fencing check); both are extended, atomically.
-- Crosses slots: the lock is a per-brand key, the record and the schedule are global.
-- KEYS: [1] receipt lock, [2] result hash, [3] schedule.
-- ARGV: [1] lock token, [2] lock ms, [3] rid, [4] dispatch, [5] lease-until.
-- Returns 'ok', 'superseded' or 'lock_lost'.

if redis.call('HGET', KEYS[2], 'dispatch') ~= ARGV[4] then return 'superseded' end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lock_lost' end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'XX', ARGV[5], ARGV[3])
return 'ok'
