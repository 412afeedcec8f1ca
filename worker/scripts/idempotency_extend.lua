-- idempotency_extend: renew the receipt lock's full TTL if it is still ours.
-- KEYS: [1] receipt lock.
-- ARGV: [1] token, [2] ttl ms.
-- Returns 1 if renewed, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
