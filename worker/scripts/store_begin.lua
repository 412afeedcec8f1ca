-- store_begin: a task starts. Only the current dispatch may run; it leases the result for
-- the run lease. PERSIST: a record written by an older version with a TTL lives until it
-- finishes.
-- KEYS: [1] result hash, [2] schedule.
-- ARGV: [1] rid, [2] dispatch, [3] lease-until.
-- Returns {'gone'}, {'stale'} or {'ok', {field, value, ...}} (the whole record).

if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[2] then return {'stale'} end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'running')
redis.call('PERSIST', KEYS[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
