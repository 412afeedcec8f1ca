-- receipt_set_state: set a receipt record's state and fields (keys.receipt), unless the
-- receipt is fiscalised already (without `force`): then only the "always" fields are
-- written, so neither its state nor its fiscal id nor the result's fields ever change. A
-- receipt not fiscalised by its record is fiscalised if its legacy marker says so (written
-- by the layout before, or by an older worker during a rolling upgrade): the marker's
-- fiscal id is copied into the record first.
-- The TTL is renewed: the fiscalised one if the record ends fiscalised, else the audit one.
-- KEYS: [1] the receipt record, [2] its legacy audit hash, [3] its legacy marker.
-- ARGV: [1] audit ttl (s), [2] fiscalised ttl (s), [3] new state (p | f | d), [4] force
--       (0/1), [5] n guarded pairs, then the guarded (field, value) pairs, then the always
--       (field, value) pairs.
-- Returns the previous state (nil if none).

local current = redis.call('HGET', KEYS[1], 's')
if current ~= 'f' then
  local marked = redis.call('GET', KEYS[3])
  if marked then
    current = 'f'
    redis.call('HSET', KEYS[1], 's', 'f', 'f', marked)
  elseif not current then
    local legacy = redis.call('HGET', KEYS[2], 'state')
    current = ({pending = 'p', fiscalised = 'f', dead_lettered = 'd'})[legacy or '']
  end
end
local keep = current == 'f' and ARGV[4] == '0'
local last_guarded = 5 + 2 * tonumber(ARGV[5])
local fields = {}  -- one HSET of every field written
if not keep then
  fields[1], fields[2] = 's', ARGV[3]
  for i = 6, last_guarded do fields[#fields + 1] = ARGV[i] end
end
for i = last_guarded + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
local final = keep and 'f' or ARGV[3]
redis.call('EXPIRE', KEYS[1], final == 'f' and ARGV[2] or ARGV[1])
return current
