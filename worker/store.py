"""The durable record of every result not finished yet, and the schedule that drives it.

Each accepted result is a hash (keys.result) plus one member of a sorted set
(keys.SCHEDULE) whose score is the unix time the result next needs attention:

    queued    score = now + QUEUE_LEASE    published to Celery, waiting in the queue
    running   score = now + RUN_LEASE      a task has it; renewed before every API call
    parked    score = retry due time       waiting out a backoff, a 429 or a busy receipt,
                                           or its brand's budget slot (minus the lead)
    due       score <= now                 admission (`admit_due`) publishes it or parks it

A result leaves both only when it is finished (fiscalised or dead-lettered), in the same
transaction that records the outcome. So whatever Celery or the transport loses — a SIGKILL
between fetch and the unacked record, a task failed by a Redis error, a message dropped by
a restart — its lease lapses and the dispatcher publishes it again: delivery does not rest
on the broker's visibility timeout. Each publication bumps `dispatch`; a task carrying an
older number is a stale duplicate and does nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker import keys
from worker.ratelimit import CALLS_PER_RESULT, RESERVE_LUA, RatePolicy

QUEUE_LEASE_SECONDS = 120.0  # published, not started yet: longer than a short queue takes
RUN_LEASE_SECONDS = 60.0  # started: longer than one API call with its timeouts (~25 s)
# (both are settings: FISCAL_QUEUE_LEASE_SECONDS, FISCAL_RUN_LEASE_SECONDS)
RECORD_TTL_SLACK_SECONDS = 86_400  # backstop TTL beyond the retry windows

# KEYS: result hash, schedule. ARGV: rid, fields-json, score, ttl.
# Creates the record only if new, so a re-claimed stream entry cannot reset a result.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# Admission: which results go to the Celery queue now. KEYS: schedule.
# ARGV: mode ('due' | 'ids'), now, limit, lease-until, result prefix, rate prefix base,
#       budget limit, window, margin, lead, calls per result, marker prefix,
#       breaker prefix, [ids...]
# A result whose receipt is already marked fiscalised needs no call: it goes at once. One
# whose brand is paused (429) or has an open circuit waits, without reserving anything, until
# that ends (spread over the cool-down). Any other reserves its calls' slots in its brand's
# budget (RESERVE_LUA; a result retried for a missing or open receipt reserves only its GET)
# and is parked until its first slot if that is more than `lead` away, its reservation kept;
# the rest are leased as queued and returned, to be published.
# Returns {parked, rid, dispatch, brand, receipt_id, ...}; drops orphans.
_ADMIT = (
    RESERVE_LUA
    + """
local now, lead = tonumber(ARGV[2]), tonumber(ARGV[10])
local function spread(rid, width)
  local h = math.floor(now * 1000)
  for i = 1, #rid do h = (h * 31 + string.byte(rid, i)) % 1000003 end
  return (h % 1000) / 1000 * math.max(1, width)
end
local function held_until(brand, rid)
  local until_ = 0
  local pause = tonumber(redis.call('GET', ARGV[6] .. brand .. ':pause'))
  if pause and pause > now then until_ = pause + spread(rid, 1) end
  local circuit = redis.call('HMGET', ARGV[13] .. brand, 'state', 'until')
  local open_until = tonumber(circuit[2])
  if circuit[1] == 'open' and open_until and open_until > now then
    until_ = math.max(until_, open_until + spread(rid, open_until - now))
  end
  return until_
end
local rids
if ARGV[1] == 'due' then
  rids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
else
  rids = {}
  for i = 14, #ARGV do table.insert(rids, ARGV[i]) end
end
local out = {0}
for _, rid in ipairs(rids) do
  local key = ARGV[5] .. rid
  local meta = redis.call('HMGET', key, 'brand', 'receipt_id', 'slot', 'not_ready_since')
  if not meta[1] then
    redis.call('ZREM', KEYS[1], rid)
  else
    local slot = tonumber(meta[3])
    if not slot then
      if redis.call('EXISTS', ARGV[12] .. meta[1] .. ':' .. meta[2]) == 1 then
        slot = now
      else
        local hold = held_until(meta[1], rid)
        if hold > 0 then
          slot = hold + lead  -- parked below, nothing reserved
        else
          local n = tonumber(ARGV[11])
          if meta[4] and meta[4] ~= '' then n = 1 end
          local _, start, step = reserve(ARGV[6] .. meta[1] .. ':', n, now,
            tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), 1e18)
          redis.call('HSET', key, 'slot', fmt(start), 'step', fmt(step), 'slots', n)
          slot = start
        end
      end
    end
    if slot - now > lead then
      redis.call('ZADD', KEYS[1], fmt(slot - lead), rid)
      out[1] = out[1] + 1
    else
      redis.call('ZADD', KEYS[1], ARGV[4], rid)
      local d = redis.call('HINCRBY', key, 'dispatch', 1)
      table.insert(out, rid); table.insert(out, d)
      table.insert(out, meta[1]); table.insert(out, meta[2] or '')
    end
  end
end
return out
"""
)

# KEYS: result hash, schedule. ARGV: rid, dispatch, lease-until.
# A task starts: only the current dispatch may run; it leases the result for RUN_LEASE.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[2] then return {'stale'} end
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: result hash, schedule. ARGV: rid, dispatch, lease-until. Renew a running lease.
_RENEW = """
if redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[2] then return 0 end
return redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[3], ARGV[1]) + 1
"""


@dataclass
class ResultRecord:
    """One unfinished result as stored; `result` is the validated ingest entry."""

    rid: str
    result: dict[str, Any]
    payload: str
    first_seen: float
    dispatch: int = 0
    attempts: int = 0  # task runs that reached the API
    failures: int = 0  # consecutive failed attempts, for the backoff
    not_ready_since: float | None = None
    transient_since: float | None = None
    auth_failures: int = 0
    last_error: str | None = None
    last_status: int | None = None
    slot: float | None = None  # first reserved call slot (unix s), from admission
    step: float = 0.0  # seconds between its reserved slots
    slots: int = 0  # how many slots it reserved

    @property
    def brand(self) -> str:
        return str(self.result["brand"])

    @property
    def receipt_id(self) -> int:
        return int(self.result["receipt_id"])

    @property
    def fiscal_id(self) -> str:
        return str(self.result["fiscal_id"])

    @property
    def venue_id(self) -> int | None:
        value = self.result.get("venue_id")
        return int(value) if value is not None else None

    @classmethod
    def from_hash(cls, rid: str, raw: Mapping[str, str]) -> ResultRecord:
        """Parse a stored record; a damaged counter reads as unset rather than failing the
        result for good (the fields that make the result, `result` and `first_seen`, must
        parse)."""

        def number(name: str, kind: type[int] | type[float]) -> Any:
            try:
                return kind(raw[name]) if raw.get(name) not in (None, "") else None
            except ValueError:
                return None

        return cls(
            rid=rid,
            result=json.loads(raw["result"]),
            payload=raw.get("payload", ""),
            first_seen=float(raw["first_seen"]),
            dispatch=number("dispatch", int) or 0,
            attempts=number("attempts", int) or 0,
            failures=number("failures", int) or 0,
            not_ready_since=number("not_ready_since", float),
            transient_since=number("transient_since", float),
            auth_failures=number("auth_failures", int) or 0,
            last_error=raw.get("last_error") or None,
            last_status=number("last_status", int),
            slot=number("slot", float),
            step=number("step", float) or 0.0,
            slots=number("slots", int) or 0,
        )


@dataclass(frozen=True)
class Claimed:
    rid: str
    dispatch: int
    brand: str
    receipt_id: str


@dataclass(frozen=True)
class Admission:
    """What one admission pass did: results to publish now, and how many it parked."""

    publish: list[Claimed]
    parked: int

    @property
    def handled(self) -> int:
        return len(self.publish) + self.parked


def _flatten(record_fields: Mapping[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else str(v)) for k, v in record_fields.items()}


class ResultStore:
    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        record_ttl: int,
        rate: RatePolicy,
        queue_lease: float = QUEUE_LEASE_SECONDS,
        run_lease: float = RUN_LEASE_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.record_ttl = record_ttl
        self.rate = rate
        self.queue_lease = queue_lease
        self.run_lease = run_lease
        self._create = redis_client.register_script(_CREATE)
        self._admit = redis_client.register_script(_ADMIT)
        self._begin = redis_client.register_script(_BEGIN)
        self._renew = redis_client.register_script(_RENEW)

    def create(
        self,
        rid: str,
        result: Mapping[str, Any],
        payload: str,
        *,
        score: float,
        now: float,
    ) -> bool:
        """Record a new result scheduled at `score`; False if it already exists."""
        fields = {
            "result": json.dumps(dict(result), separators=(",", ":")),
            "payload": payload,
            "brand": result["brand"],
            "receipt_id": result["receipt_id"],
            "first_seen": repr(now),
            "dispatch": 0,
        }
        created = self._create(
            keys=[keys.result(rid), keys.SCHEDULE],
            args=[rid, json.dumps(_flatten(fields)), repr(score), self.record_ttl],
        )
        return bool(created)

    def admit_due(self, now: float, limit: int) -> Admission:
        """Admit up to `limit` due results (the dispatcher's pass)."""
        return self._run_admit("due", now, limit, [])

    def admit(self, rids: list[str], now: float) -> Admission:
        """Admit these just-created results (the ingest consumer's fast path)."""
        return self._run_admit("ids", now, len(rids), rids) if rids else Admission([], 0)

    def _run_admit(self, mode: str, now: float, limit: int, rids: list[str]) -> Admission:
        flat = self._admit(
            keys=[keys.SCHEDULE],
            args=[
                mode,
                repr(now),
                limit,
                repr(now + self.queue_lease),
                keys.result(""),
                keys.RATE_PREFIX,
                *self.rate.lua_args(),
                repr(self.rate.lead),
                CALLS_PER_RESULT,
                keys.FISCALISED_PREFIX,
                keys.breaker(""),
                *rids,
            ],
        )
        publish = [
            Claimed(str(flat[i]), int(flat[i + 1]), str(flat[i + 2]), str(flat[i + 3]))
            for i in range(1, len(flat), 4)
        ]
        return Admission(publish, int(flat[0]))

    def begin(self, rid: str, dispatch: int, now: float) -> ResultRecord | str:
        """The record if this dispatch may run, else 'gone' (finished) or 'stale'."""
        reply = self._begin(
            keys=[keys.result(rid), keys.SCHEDULE],
            args=[rid, dispatch, repr(now + self.run_lease)],
        )
        if reply[0] != "ok":
            return str(reply[0])
        flat = reply[1]
        raw = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}
        return ResultRecord.from_hash(rid, raw)

    def renew(self, record: ResultRecord, now: float) -> bool:
        """Extend the running lease; False if a newer dispatch took the result over."""
        renewed = self._renew(
            keys=[keys.result(record.rid), keys.SCHEDULE],
            args=[record.rid, record.dispatch, repr(now + self.run_lease)],
        )
        return bool(renewed)

    def park(self, record: ResultRecord, due: float, pipe: redis.client.Pipeline) -> None:
        """Queue on `pipe`: save the record's counters and schedule it at `due`."""
        pipe.hset(
            keys.result(record.rid),
            mapping=_flatten(
                {
                    "attempts": record.attempts,
                    "failures": record.failures,
                    "not_ready_since": record.not_ready_since,
                    "transient_since": record.transient_since,
                    "auth_failures": record.auth_failures,
                    "last_error": record.last_error,
                    "last_status": record.last_status,
                }
            ),
        )
        pipe.hdel(keys.result(record.rid), "slot", "step", "slots")  # its reservation is spent
        pipe.zadd(keys.SCHEDULE, {record.rid: due}, xx=True)

    def forget(self, rid: str, pipe: redis.client.Pipeline) -> None:
        """Queue on `pipe`: the result is finished; drop its record and schedule entry."""
        pipe.delete(keys.result(rid))
        pipe.zrem(keys.SCHEDULE, rid)
