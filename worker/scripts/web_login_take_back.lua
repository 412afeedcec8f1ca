-- web_login_take_back: undo what web_login_attempt counted in advance, for a login that
-- succeeded or whose password was never checked. Each counter loses that one failure (a
-- count of 0 is deleted; a key that lapsed or is damaged is left alone, never recreated)
-- and gets back its previous 'last' unless a later attempt has written its own since. The
-- lifetime is kept: it was set for a longer count.
-- KEYS: [1] the (user, client) counter, [2] the client's counter.
-- ARGV: [1] the attempt's time, as web_login_attempt wrote it, [2] [3] the previous 'last'
--       of KEYS[1] and KEYS[2] it returned, [4] '1' when the login succeeded: the
--       (user, client) counter is deleted (the user proved the password from there).
-- Returns 1.
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
for i = 1, 2 do
  local failures = tonumber(redis.call('HGET', KEYS[i], 'failures') or '')
  if failures ~= nil then
    if failures <= 1 then
      redis.call('DEL', KEYS[i])
    else
      redis.call('HSET', KEYS[i], 'failures', failures - 1)
      if redis.call('HGET', KEYS[i], 'last') == ARGV[1] and ARGV[1 + i] ~= '' then
        redis.call('HSET', KEYS[i], 'last', ARGV[1 + i])
      end
    end
  end
end
return 1
