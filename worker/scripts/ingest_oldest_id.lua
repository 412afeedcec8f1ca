-- ingest_oldest_id: the id of the stream's oldest entry, without its fields (an adapter may
-- have written any bytes there, and up to an entry's size limit): for the ingest lag.
-- KEYS: [1] the ingest stream.
-- ARGV: none.
-- Returns the id, or false when the stream is empty or missing.

local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if oldest[1] then return oldest[1][1] end
return false
