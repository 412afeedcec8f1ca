-- dlq_head: the fields of one dead-letter entry before its payload, cut on the server.
-- KEYS: [1] entry.
-- ARGV: [1] bytes to look at, [2] the payload's marker (`,"payload":`).
-- Returns the entry's JSON up to the marker ('' when there is no entry, false when the
-- marker is not in the first ARGV[1] bytes: read the entry whole). The cut is at the
-- marker's first byte, so it never splits a UTF-8 character, and a 1 MiB payload never
-- leaves Redis.
local head = redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if head == '' then
  return ''
end
local cut = string.find(head, ARGV[2], 1, true)
if not cut then
  return false
end
return string.sub(head, 1, cut - 1)
