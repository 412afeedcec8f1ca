-- dlq_add: add one dead-letter entry with its index memberships, counts and size, unless the
-- by-result key (KEYS[7], only when the result has an id) names an entry still in the store;
-- and count it in the hour it was added (the last KEY, the console's trend).
-- KEYS: [1] entry, [2] index, [3] by_reason, [4] by_brand, [5] counts, [6] bytes,
--       [7] by_result (optional), [last] hourly.
-- ARGV: [1] id, [2] reason count field, [3] brand count field, [4] seq, [5] entry JSON,
--       [6] the hour (unix time // 3600).
-- Returns {id, 1, total entries, total bytes} when added, {existing id, 0} when not.

-- #include dlq_bytes_fn.lua
local hourly = KEYS[#KEYS]
local by_result = #KEYS == 8 and KEYS[7] or nil
local existing = by_result and redis.call('GET', by_result)
if existing and redis.call('ZSCORE', KEYS[2], existing) then
  return {existing, 0}
end
redis.call('SET', KEYS[1], ARGV[5])
for i = 2, 4 do
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[1])
end
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
local size = add_bytes(KEYS[6], string.len(ARGV[5]))
if by_result then
  redis.call('SET', by_result, ARGV[1])
end
local hour = tonumber(ARGV[6])
redis.call('HINCRBY', hourly, ARGV[6], 1)
if redis.call('HLEN', hourly) > 2 * 26 then  -- bounded: hours older than two days go
  for _, field in ipairs(redis.call('HKEYS', hourly)) do
    if (tonumber(field) or 0) < hour - 48 then
      redis.call('HDEL', hourly, field)
    end
  end
end
return {ARGV[1], 1, redis.call('ZCARD', KEYS[2]), size}
