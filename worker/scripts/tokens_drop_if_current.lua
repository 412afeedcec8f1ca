-- tokens_drop_if_current: drop the brand's cached token only if it is the one that was
-- rejected (a newer token another process just fetched is kept).
-- KEYS: [1] the brand's token (JSON {token, expires_at, lifetime}).
-- ARGV: [1] the rejected access token.
-- Returns 1 if dropped, else 0.

local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
