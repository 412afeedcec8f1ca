-- idempotency_release: delete the receipt lock if it is still ours.
-- KEYS: [1] receipt lock.
-- ARGV: [1] token.
-- Returns 1 if deleted, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
