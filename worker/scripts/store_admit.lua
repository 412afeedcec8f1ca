-- store_admit: which results go to the Celery queue now (ResultStore.admit_due / admit).
--
-- Two steps, so that every key is passed in KEYS: the caller reads the candidates (mode
-- 'due': the schedule's entries due by `now`, up to its limit; mode 'ids': results it has
-- just created) and each one's brand and receipt_id, and passes their keys; this script
-- then checks each candidate again, atomically, before it touches it:
--   'due'  still in the schedule and due by now (else another dispatcher took it, or it
--          finished, since the read: skipped)
--   'ids'  its record still says state 'due' (else a dispatcher took it, or it finished)
--   and its record still has the brand and receipt_id the caller read (else skipped: the
--   next pass reads it again). A 'due' candidate whose record is gone is an orphan.
-- A result past its deadline, or whose receipt's record says fiscalised, needs no call:
-- it goes at once (its task dead-letters or absorbs it). One whose brand is paused (429) or
-- has an open circuit waits, without reserving anything, until that ends (spread over the
-- cool-down). Any other reserves its calls' slots in its brand's budget (reserve(), from
-- ratelimit_reserve_fn.lua; a not-ready retry reserves only its GET; a result marked
-- `first` - already under way - reserves ahead of the queue) and is parked until its first
-- slot if that is more than `lead` away, its reservation kept; the rest are leased as
-- queued and returned. An orphan (a schedule entry whose record is gone) is kept, looked at
-- again `orphan recheck` seconds later, and returned for the dispatcher to dead-letter
-- (never dropped silently).
-- Crosses slots: the schedule and the records are global, the other keys per brand.
--
-- KEYS: [1] schedule, then per candidate, in ARGV's order:
--         read with a brand: 8 keys: result hash, receipt record, legacy fiscalised
--           marker, rate tat, rate front, rate pause, rate others, breaker hash (of its
--           brand and receipt)
--         read without one (no record, or a damaged one with an empty brand): 1 key:
--           result hash; such a record, if it exists, is published at once
-- ARGV: [1] mode ('due' | 'ids'), [2] now, [3] lease-until (of a queued result),
--       [4] budget limit, [5] window, [6] margin, [7] lead, [8] calls per result,
--       [9] orphan recheck (s), [10] breaker state field, [11] breaker until field,
--       [12] breaker state value while open (keys.BREAKER_*),
--       then per candidate: rid, brand ('' if read without a record), receipt_id.
-- Returns {parked, {orphan rids}, {rid, dispatch, brand, receipt_id, ...}, skipped}.

-- #include ratelimit_reserve_fn.lua
local mode, now, lead = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[7])
local state_field, until_field, open = ARGV[10], ARGV[11], ARGV[12]
local function spread(rid, width)
  local h = math.floor(now * 1000)
  for i = 1, #rid do h = (h * 31 + string.byte(rid, i)) % 1000003 end
  return (h % 1000) / 1000 * math.max(1, width)
end
local function held_until(k, rid)
  local until_ = 0
  local pause = tonumber(redis.call('GET', k.pause))
  if pause and pause > now then until_ = pause + spread(rid, 1) end
  local circuit = redis.call('HMGET', k.breaker, state_field, until_field)
  local open_until = tonumber(circuit[2])
  if circuit[1] == open and open_until and open_until > now then
    until_ = math.max(until_, open_until + spread(rid, open_until - now))
  end
  return until_
end
local parked, orphans, out, skipped = 0, {}, {}, 0
local next_key = 2
for i = 13, #ARGV, 3 do
  local rid, brand, receipt = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = KEYS[next_key]
  local k  -- the keys of its brand and receipt
  if brand ~= '' then
    k = {record = KEYS[next_key + 1], marker = KEYS[next_key + 2], tat = KEYS[next_key + 3],
         front = KEYS[next_key + 4], pause = KEYS[next_key + 5], others = KEYS[next_key + 6],
         breaker = KEYS[next_key + 7]}
    next_key = next_key + 8
  else
    next_key = next_key + 1
  end
  local meta = redis.call('HMGET', key, 'brand', 'receipt_id', 'slot', 'not_ready_since',
    'deadline', 'first', 'state')
  local score = mode == 'due' and tonumber(redis.call('ZSCORE', KEYS[1], rid))
  if mode == 'ids' and meta[7] ~= 'due' then
    -- the ingest fast path: a dispatcher took it (or it finished) since it was recorded
    skipped = skipped + 1
  elseif mode == 'due' and not (score and score <= now) then
    -- another dispatcher took it (or it finished) since the caller read the schedule
    skipped = skipped + 1
  elseif not meta[1] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[9]), rid)
    table.insert(orphans, rid)
  elseif meta[1] ~= brand or (meta[2] or '') ~= receipt then
    -- not the record the caller read (so not the keys it passed): left for the next pass
    skipped = skipped + 1
  else
    local slot = tonumber(meta[3])
    local deadline = tonumber(meta[5])
    if deadline and now >= deadline then
      slot = now
    elseif not slot then
      if k == nil then
        slot = now  -- a record without a brand (damaged): its task dead-letters it
      elseif redis.call('HGET', k.record, 's') == 'f' or redis.call('EXISTS', k.marker) == 1 then
        slot = now
      else
        local hold = held_until(k, rid)
        if hold > 0 then
          slot = hold + lead  -- parked below, nothing reserved
        else
          local n = tonumber(ARGV[8])
          if meta[4] and meta[4] ~= '' and meta[6] ~= '1' then n = 1 end
          local _, start, step = reserve(k, n, now,
            tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), 1e18, meta[6] == '1')
          redis.call('HSET', key, 'slot', fmt(start), 'step', fmt(step), 'slots', n)
          slot = start
        end
      end
      if deadline and slot - lead > deadline then slot = deadline + lead end
    end
    if slot - now > lead then
      redis.call('ZADD', KEYS[1], fmt(slot - lead), rid)
      redis.call('HSET', key, 'state', 'parked')
      parked = parked + 1
    else
      redis.call('ZADD', KEYS[1], ARGV[3], rid)
      local d = redis.call('HINCRBY', key, 'dispatch', 1)
      redis.call('HSET', key, 'state', 'queued')
      table.insert(out, rid); table.insert(out, d)
      table.insert(out, meta[1]); table.insert(out, meta[2] or '')
    end
  end
end
return {parked, orphans, out, skipped}
