-- dlq_replay: XADD an entry's payload to the ingest stream and remove the entry, in one
-- step; nothing if the entry is gone.
-- KEYS: [1] the ingest stream, then the removal keys: [2] entry, [3] index, [4] by_reason,
--       [5] by_brand, [6] counts, [7] bytes, [8] by_result (optional).
-- ARGV: [1] id, [2] reason count field, [3] brand count field, [4] payload.
-- Returns the new stream entry id, or nil if there was no entry.

-- #include dlq_remove_fn.lua
local K = {unpack(KEYS, 2)}
if redis.call('EXISTS', K[1]) == 0 then return false end
local stream_id = redis.call('XADD', KEYS[1], '*', 'data', ARGV[4], 'replay_of', ARGV[1])
remove_entry(K, ARGV[1], ARGV[2], ARGV[3])
return stream_id
