-- dlq_remove_fn: a fragment (included, never run alone) defining
--   remove_entry(K, id, reason_field, brand_field) -> existed (1/0)
-- which removes one dead-letter entry with its index memberships, counts, size and
-- by-result key (if that still names this entry). Included by dlq_remove.lua and
-- dlq_replay.lua.
-- KEYS: none of its own: K is the removal keys, which the including script got through
--       KEYS: [1] entry, [2] index, [3] by_reason, [4] by_brand, [5] counts, [6] bytes,
--       [7] by_result (only when the entry has a result id).
-- ARGV: none of its own (the including script passes id and the count fields).

-- #include dlq_bytes_fn.lua
local function remove_entry(K, id, reason_field, brand_field)
  local raw = redis.call('GET', K[1])
  redis.call('ZREM', K[2], id)
  local existed = 0
  if raw then
    existed = 1
    redis.call('DEL', K[1])
    redis.call('ZREM', K[3], id)
    redis.call('ZREM', K[4], id)
    for _, field in ipairs({reason_field, brand_field}) do
      if redis.call('HINCRBY', K[5], field, -1) <= 0 then
        redis.call('HDEL', K[5], field)
      end
    end
    add_bytes(K[6], -string.len(raw))
    if K[7] and redis.call('GET', K[7]) == id then
      redis.call('DEL', K[7])
    end
  end
  return existed
end
