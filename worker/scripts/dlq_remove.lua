-- dlq_remove: remove one dead-letter entry (see dlq_remove_fn.lua).
-- KEYS: [1] entry, [2] index, [3] by_reason, [4] by_brand, [5] counts, [6] bytes,
--       [7] by_result (optional).
-- ARGV: [1] id, [2] reason count field, [3] brand count field.
-- Returns 1 if the entry was there, else 0.

-- #include dlq_remove_fn.lua
return remove_entry(KEYS, ARGV[1], ARGV[2], ARGV[3])
