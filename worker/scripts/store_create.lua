-- store_create: record a new result, only if it is new, so a re-claimed stream entry cannot
-- reset a result. A live record has no TTL: it ends when the result finishes, or at its
-- deadline (dead-lettered).
-- KEYS: [1] result hash, [2] schedule.
-- ARGV: [1] rid, [2] the record's fields (a JSON object of strings), [3] score (due at).
-- Returns 1 if it was created, 0 if the record existed.

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[2])
local flat = {}
for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
