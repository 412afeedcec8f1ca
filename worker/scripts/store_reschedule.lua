-- store_reschedule: put back in the schedule, due now, every record that lost its schedule
-- entry (the dispatcher's sweep).
-- KEYS: [1] schedule, then one result hash per rid.
-- ARGV: [1] now, then the rids, in KEYS' order.
-- Returns the rids it put back.

local found = {}
for i = 2, #KEYS do
  local rid = ARGV[i]
  if redis.call('EXISTS', KEYS[i]) == 1 and not redis.call('ZSCORE', KEYS[1], rid) then
    redis.call('ZADD', KEYS[1], ARGV[1], rid)
    table.insert(found, rid)
  end
end
return found
