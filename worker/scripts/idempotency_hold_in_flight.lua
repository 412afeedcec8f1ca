-- idempotency_hold_in_flight: a PATCH of ours may still be in flight at the server. Hold the
-- receipt that long under a token nobody matches (not even a newer dispatch of this
-- result), then it frees itself.
-- KEYS: [1] receipt lock.
-- ARGV: [1] token, [2] ms.
-- Returns 1 if the lock was ours (and is held now), else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], 'in-flight:' .. ARGV[1], 'PX', ARGV[2]) and 1 or 0
end
return 0
