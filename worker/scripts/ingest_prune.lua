-- ingest_prune: delete the group's consumers (but this one) with nothing pending, idle
-- longer than `idle ms`; checked and deleted in one step, so none can take an entry in
-- between and lose it.
-- KEYS: [1] the ingest stream.
-- ARGV: [1] group, [2] this consumer, [3] idle ms.
-- Returns the deleted consumers' names.

local pruned = {}
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #row, 2 do info[row[i]] = row[i + 1] end
  if info['name'] ~= ARGV[2] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(pruned, info['name'])
  end
end
return pruned
