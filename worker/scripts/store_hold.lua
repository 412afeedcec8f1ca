-- store_hold: a live worker's heartbeat. The results it holds (received, prefetched or
-- running) stay leased; a parked or re-dispatched one is left alone.
-- KEYS: [1] schedule, then one result hash per held result.
-- ARGV: [1] lease-until, then one (rid, dispatch) pair per result, in KEYS' order.
-- Returns how many leases it renewed.

local renewed = 0
for i = 2, #KEYS do
  local rid, dispatch = ARGV[2 * i - 2], ARGV[2 * i - 1]
  local meta = redis.call('HMGET', KEYS[i], 'dispatch', 'state')
  if meta[1] == dispatch and (meta[2] == 'queued' or meta[2] == 'running') then
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[1], rid)
  end
end
return renewed
