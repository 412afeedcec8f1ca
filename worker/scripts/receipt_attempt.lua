-- receipt_attempt: record one API call's line in a receipt record: field `a<i>` of a ring
-- of `max` fields, `n` counting every attempt (the i-th attempt is in `a<(i-1) % max>`), so
-- each field stays short and the record in Redis's compact encoding; renew the record's
-- TTL (the fiscalised one if it is fiscalised, else the audit one).
-- KEYS: [1] the receipt record.
-- ARGV: [1] the attempt's line (no newline in it), [2] max attempts kept, [3] audit ttl
--       (s), [4] fiscalised ttl (s).
-- Returns the number of attempts recorded so far.

local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'a' .. ((n - 1) % tonumber(ARGV[2])), ARGV[1])
local fiscalised = redis.call('HGET', KEYS[1], 's') == 'f'
redis.call('EXPIRE', KEYS[1], fiscalised and ARGV[4] or ARGV[3])
return n
