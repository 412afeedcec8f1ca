-- ingest_read: read stream entries one at a time while their total size fits in a byte
-- budget. 'new' reads with XREADGROUP ... >; 'claim' takes over idle pending entries with
-- XAUTOCLAIM from `cursor`, one scan step (COUNT 1, up to 10 PEL entries) per round. The
-- first entry that does not fit is read too (it is pending for this consumer now) but only
-- its id is returned. Neither command is refused at maxmemory, so this runs when Redis
-- refuses writes.
-- KEYS: [1] the ingest stream.
-- ARGV: [1] group, [2] consumer, [3] max entries, [4] byte budget, [5] mode ('new' |
--       'claim'), [6] min idle ms (claim), [7] cursor (claim).
-- Returns {next cursor, id of the entry that did not fit or '', id, {field, value...}, ...}.

local budget = tonumber(ARGV[4])
local cursor = ARGV[7]
local out = {'0-0', ''}
for _ = 1, tonumber(ARGV[3]) do
  local items
  if ARGV[5] == 'new' then
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
                             'STREAMS', KEYS[1], '>')
    if not reply or #reply == 0 then break end
    -- {{stream, entries}} from Redis; fakeredis hands a script {stream, entries}
    if type(reply[1]) == 'table' then items = reply[1][2] else items = reply[2] end
  else
    local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[6], cursor,
                             'COUNT', 1)
    cursor = reply[1]
    items = reply[2]
  end
  local entry = items and items[1]
  if entry and type(entry[2]) == 'table' then  -- (Redis 6.2 claims a deleted entry as {id})
    local size = 0
    for i = 1, #entry[2] do size = size + #entry[2][i] end
    if size > budget then
      out[2] = entry[1]
      break
    end
    budget = budget - size
    table.insert(out, entry[1])
    table.insert(out, entry[2])
  end
  if ARGV[5] == 'claim' and cursor == '0-0' then break end
end
if ARGV[5] == 'claim' then out[1] = cursor end
return out
