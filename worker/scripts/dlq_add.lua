-- dlq_add: add one dead-letter entry with its index memberships, counts and size, unless the
-- by-result key (KEYS[9], only when the result has an id) names an entry still in the store;
-- and count it in the hour it was added (the console's trend).
-- KEYS: [1] entry, [2] index, [3] by_reason, [4] by_brand, [5] counts, [6] bytes,
--       [7] hourly, [8] order, [9] by_result (optional).
-- ARGV: [1] id, [2] reason count field, [3] brand count field, [4] seq (the id's number),
--       [5] entry JSON, [6] the hour (unix time // 3600).
-- The indexes' score is the entry's place in commit order: its seq, unless an entry whose
-- seq came later committed first (an id is allocated before its transaction commits), then
-- one above the last score given (the order counter). So a bulk action fenced at "the newest
-- score now" touches no entry committed after it.
-- Returns {id, 1, total entries, total bytes} when added, {existing id, 0} when not.

-- #include dlq_bytes_fn.lua
local by_result = KEYS[9]
local existing = by_result and redis.call('GET', by_result)
if existing and redis.call('ZSCORE', KEYS[2], existing) then
  return {existing, 0}
end
local last = tonumber(redis.call('GET', KEYS[8]) or '0')
if not last then  -- a damaged counter: on from the highest score given
  local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  last = tonumber(top[2] or '0') or 0
end
local score = math.max(tonumber(ARGV[4]), last + 1)
redis.call('SET', KEYS[8], score)
redis.call('SET', KEYS[1], ARGV[5])
for i = 2, 4 do
  redis.call('ZADD', KEYS[i], score, ARGV[1])
end
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
local size = add_bytes(KEYS[6], string.len(ARGV[5]))
if by_result then
  redis.call('SET', by_result, ARGV[1])
end
local hour = tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[7], ARGV[6], 1)
if redis.call('HLEN', KEYS[7]) > 2 * 26 then  -- bounded: hours older than two days go
  for _, field in ipairs(redis.call('HKEYS', KEYS[7])) do
    if (tonumber(field) or 0) < hour - 48 then
      redis.call('HDEL', KEYS[7], field)
    end
  end
end
return {ARGV[1], 1, redis.call('ZCARD', KEYS[2]), size}
