-- idempotency_acquire: take a free receipt lock; or one that an older dispatch of the same
-- result holds: that run is dead or superseded (its fence fails), and a request it may
-- still have in flight carries this same result's fiscal id. Tokens are
-- `<rid>:<dispatch>:<random>`. A receipt already fiscalised (its record in state `f`, or a
-- legacy marker) is not locked: the marker is the answer.
-- KEYS: [1] receipt lock, [2] receipt record, [3] legacy fiscalised marker (same receipt).
-- ARGV: [1] token, [2] ttl ms, [3] "<rid>:", [4] dispatch.
-- Returns {taken (1/0), the marker's fiscal id or ''}.

local record = redis.call('HMGET', KEYS[2], 's', 'f')
if record[1] == 'f' and record[2] then return {0, record[2]} end
if record[1] ~= 'f' then  -- the layout before, or an older worker, may have marked it
  local marked = redis.call('GET', KEYS[3])
  if marked then return {0, marked} end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ''} end
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[3]) == ARGV[3] then
  local older = tonumber(string.match(string.sub(held, #ARGV[3] + 1), '^(%d+):'))
  if older and older < tonumber(ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return {1, ''}
  end
end
return {0, ''}
