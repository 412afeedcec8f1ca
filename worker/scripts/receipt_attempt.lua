-- receipt_attempt: append one API call's line to a receipt record's attempts (field `a`,
-- oldest first, one per line), keep the last `max` of them, and renew the record's TTL
-- (the fiscalised one if it is fiscalised, else the audit one).
-- KEYS: [1] the receipt record.
-- ARGV: [1] the attempt's line (no newline in it), [2] max attempts kept, [3] audit ttl
--       (s), [4] fiscalised ttl (s).
-- Returns the number of attempts kept.

local lines = {}
local old = redis.call('HGET', KEYS[1], 'a')
if old then
  for line in string.gmatch(old, '[^\n]+') do lines[#lines + 1] = line end
end
lines[#lines + 1] = ARGV[1]
local max = tonumber(ARGV[2])
local first = math.max(1, #lines - max + 1)
redis.call('HSET', KEYS[1], 'a', table.concat(lines, '\n', first, #lines))
local fiscalised = redis.call('HGET', KEYS[1], 's') == 'f'
redis.call('EXPIRE', KEYS[1], fiscalised and ARGV[4] or ARGV[3])
return #lines - first + 1
