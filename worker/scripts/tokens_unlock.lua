-- tokens_unlock: release the brand's token refresh lock (compare and delete): delete the
-- key only if it still holds the value we put there.
-- KEYS: [1] token refresh lock (one brand).
-- ARGV: [1] owner (the value we set).
-- Returns 1 if deleted, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
