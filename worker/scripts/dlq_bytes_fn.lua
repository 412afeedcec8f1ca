-- dlq_bytes_fn: a fragment (included, never run alone) defining
--   add_bytes(key, delta) -> the new size
-- which sets a non-negative counter key to its value + delta (deleted at 0; a damaged
-- value counts as 0). Included by dlq_add.lua and dlq_remove_fn.lua.
-- KEYS: none of its own (the including script passes the counter key, keys.DLQ_BYTES).
-- ARGV: none of its own.

local function add_bytes(key, delta)
  local size = (tonumber(redis.call('GET', key)) or 0) + delta
  if size > 0 then
    redis.call('SET', key, string.format('%d', size))
  else
    redis.call('DEL', key)
    size = 0
  end
  return size
end
