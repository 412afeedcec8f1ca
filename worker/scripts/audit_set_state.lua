-- audit_set_state: set a receipt's audit state and fields, unless that would move a
-- fiscalised record off fiscalised (without `force`); the "always" fields are written
-- regardless. Both keys' TTLs are renewed.
-- KEYS: [1] audit hash, [2] attempts list (one brand's receipt).
-- ARGV: [1] ttl (s), [2] new state, [3] force (0/1), [4] n guarded pairs,
--       then the guarded (field, value) pairs, then the always (field, value) pairs.
-- Returns the previous state (nil if none).

local current = redis.call('HGET', KEYS[1], 'state')
local keep = current == 'fiscalised' and ARGV[2] ~= 'fiscalised' and ARGV[3] == '0'
local last_guarded = 4 + 2 * tonumber(ARGV[4])
local fields = {}  -- one HSET of every field written
if not keep then
  fields[1], fields[2] = 'state', ARGV[2]
  for i = 5, last_guarded do fields[#fields + 1] = ARGV[i] end
end
for i = last_guarded + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return current
