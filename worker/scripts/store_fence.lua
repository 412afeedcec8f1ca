-- store_fence: right before a request is sent. This run must still be the result's current
-- dispatch and hold the receipt's lock (a fencing check); both are extended, atomically.
-- Crosses slots: the lock is a per-brand key, the record and the schedule are global.
-- KEYS: [1] receipt lock, [2] result hash, [3] schedule.
-- ARGV: [1] lock token, [2] lock ms, [3] rid, [4] dispatch, [5] lease-until.
-- Returns 'ok', 'superseded' or 'lock_lost'.

-- #include store_fence_fn.lua
local fenced = fence_check(KEYS[2], KEYS[1], ARGV[1], ARGV[4])
if fenced == 'ok' then fence_extend(KEYS[1], ARGV[2], KEYS[3], ARGV[3], ARGV[5]) end
return fenced
