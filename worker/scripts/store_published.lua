-- store_published: these admitted results' messages are in the queue. Lease them for as long
-- as a message may wait there, unless a worker already received one (its hold changed the
-- score: that worker's heartbeat owns the lease now).
-- KEYS: [1] schedule, then one result hash per published result.
-- ARGV: [1] the publish lease they were admitted with, [2] the queue lease (until), then
--       one (rid, dispatch) pair per result, in KEYS' order.
-- Returns how many leases it extended.

local extended = 0
for i = 2, #KEYS do
  local rid, dispatch = ARGV[2 * i - 1], ARGV[2 * i]
  local meta = redis.call('HMGET', KEYS[i], 'dispatch', 'state')
  local score = redis.call('ZSCORE', KEYS[1], rid)
  if meta[1] == dispatch and meta[2] == 'queued' and score
      and tonumber(score) == tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ARGV[2], rid)
    extended = extended + 1
  end
end
return extended
