"""One request budget per brand, shared by every worker process: a scheduling limiter.

    RatePolicy(limit=300, window=60, margin=0.03, lead=1.0, short_wait=2.0)

    capacity    calls planned per window: floor((limit - others) * (1 - margin)), and at
                least 1 below limit - others
    interval    window / capacity. GCRA: the brand's next free slot (its "theoretical
                arrival time", TAT) lives in Redis; a reservation takes the next n slots
                and learns when they are, so no one polls for a free moment
    others      what other clients of the same (integrator, brand) use, estimated from
                RateLimit-Remaining (limit - remaining - our own calls in the window); it
                lowers the capacity for one window after it was last seen
    pause       a 429 pauses the brand, every process, for RateLimit-Reset seconds
    guard       right before each request, our calls of the last window (a log in Redis)
                plus others' must leave one call spare, as Clopos counts them; else the
                call waits (a short wait is slept: jitter costs a few ms, not a slot).
                Slots keep the pace; this keeps the server's count, whatever
                happened to the slots (late workers, a budget that shrank after they
                were reserved)
    lead        a result is published this long before its first slot
    short_wait  a call whose slot is further away does not hold a worker: the result parks

A result is admitted by the dispatcher (worker/store.py): it reserves CALLS_PER_RESULT slots
(GET and PATCH) and is parked in the schedule until its first slot; so a brand's backlog
waits in Redis spread over its budget, and another brand's result, due now, goes first.
The auth budget (60/min per IP at Clopos) is a second, global GCRA (AuthBudget).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker import keys
from worker.errors import RateLimitInfo

CALLS_PER_RESULT = 2  # GET + PATCH
MARGIN = 0.03  # planned below the nominal budget: 291 of 300
LEAD_SECONDS = 1.0
SHORT_WAIT_SECONDS = 2.0
AUTH_PER_MINUTE = 30  # half of Clopos' 60/min per IP: refreshes of many brands are spread
AUTH_BURST = 3  # auth calls that may go at once; the rest are spread at the pace above
AUTH_MAX_WAIT_SECONDS = 10.0

# Defines reserve(prefix, n, now, limit, window, margin, max_wait, first) -> ok, start, step.
# Shared by the scripts below and by the dispatcher's admission script (worker/store.py).
# `first` (a result already under way: its PATCH after a not-ready GET, a re-try after a
# 401, one deferred by a 429 pause) takes its slots ahead of the queue, paced among its kind
# by a front pointer (so a pause's end is not a herd), and pushes the queue back by as many:
# the pace is kept, and the window guard (_TAKE) keeps the server's count.
RESERVE_LUA = """
local function fmt(x) return string.format('%.6f', x) end
local function reserve(prefix, n, now, limit, window, margin, max_wait, first)
  local tat = tonumber(redis.call('GET', prefix .. 'tat')) or 0
  local pause = tonumber(redis.call('GET', prefix .. 'pause')) or 0
  local others = tonumber(redis.call('GET', prefix .. 'others')) or 0
  local room = limit - others
  local cap = math.min(math.floor(room * (1 - margin)), room - 1)
  if cap < 1 then cap = 1 end
  local step = window / cap
  local start = math.max(tat, now, pause)
  local new_tat = start + n * step
  if first then
    local front = tonumber(redis.call('GET', prefix .. 'front')) or 0
    start = math.max(now, pause, front)
    local new_front = start + n * step
    redis.call('SET', prefix .. 'front', fmt(new_front),
      'PX', math.ceil((new_front - now + window) * 1000))
  elseif start - now > max_wait then
    return 0, start, step
  end
  redis.call('SET', prefix .. 'tat', fmt(new_tat), 'PX', math.ceil((new_tat - now + window) * 1000))
  return 1, start, step
end
"""

# KEYS: none (prefix in ARGV). ARGV: prefix, n, now, limit, window, margin, max_wait, first.
_RESERVE = (
    RESERVE_LUA
    + """
local ok, start, step = reserve(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1')
return {ok, fmt(start), fmt(step)}
"""
)

# ARGV: prefix, now, seconds. Pause the brand; its next slot is after the pause.
_PAUSE = """
local until_ = tonumber(ARGV[2]) + tonumber(ARGV[3])
local current = tonumber(redis.call('GET', ARGV[1] .. 'pause')) or 0
if until_ > current then
  local ms = math.ceil(tonumber(ARGV[3]) * 1000)
  redis.call('SET', ARGV[1] .. 'pause', string.format('%.6f', until_), 'PX', ms)
end
local tat = tonumber(redis.call('GET', ARGV[1] .. 'tat')) or 0
if tat < until_ then
  local ms = math.ceil((until_ - tonumber(ARGV[2])) * 1000) + 60000
  redis.call('SET', ARGV[1] .. 'tat', string.format('%.6f', until_), 'PX', ms)
end
return 1
"""

# ARGV: prefix, now, window, limit, member. The call about to go: counted in our log of
# the window if ours + others + 1 leaves one call spare (our clock and the server's see the
# window's edges a few ms apart); else {0, when one leaves}.
_TAKE = """
local calls = ARGV[1] .. 'calls'
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window)
local ours = redis.call('ZCARD', calls)
local others = tonumber(redis.call('GET', ARGV[1] .. 'others')) or 0
if ours + others + 1 > tonumber(ARGV[4]) - 1 then
  local oldest = redis.call('ZRANGE', calls, 0, 0, 'WITHSCORES')
  local free_at = now + 1
  if oldest[2] then free_at = tonumber(oldest[2]) + window end
  return {0, string.format('%.6f', free_at)}
end
redis.call('ZADD', calls, now, ARGV[5])
redis.call('PEXPIRE', calls, math.ceil(window * 1000))
return {1, ARGV[2]}
"""

# ARGV: prefix, sent, window, limit, remaining. Others' use = limit - remaining - ours, where
# ours = our calls the server had counted when it answered: those sent up to this one.
_OBSERVE = """
local sent, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local ours = redis.call('ZCOUNT', ARGV[1] .. 'calls', sent - window, sent)
local others = tonumber(ARGV[4]) - tonumber(ARGV[5]) - ours
local current = tonumber(redis.call('GET', ARGV[1] .. 'others')) or 0
if others > current or (others > 0 and redis.call('PTTL', ARGV[1] .. 'others') < 0) then
  redis.call('SET', ARGV[1] .. 'others', others, 'PX', math.ceil(window * 1000))
end
return others
"""


@dataclass(frozen=True)
class Reservation:
    ok: bool
    start: float  # when the first slot is (or would be)
    step: float  # interval between the slots


@dataclass(frozen=True)
class RatePolicy:
    limit: int = 300
    window: float = 60.0
    margin: float = MARGIN
    lead: float = LEAD_SECONDS
    short_wait: float = SHORT_WAIT_SECONDS

    def lua_args(self) -> list[str]:
        """limit, window, margin, as the admission script expects them."""
        return [str(self.limit), repr(self.window), repr(self.margin)]


class BrandBudget:
    def __init__(
        self,
        redis_client: redis.Redis,
        policy: RatePolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.policy = policy
        self.clock = clock
        self._reserve = redis_client.register_script(_RESERVE)
        self._pause = redis_client.register_script(_PAUSE)
        self._observe = redis_client.register_script(_OBSERVE)
        self._take = redis_client.register_script(_TAKE)

    def reserve(
        self, brand: str, n: int = 1, max_wait: float | None = None, *, first: bool = False
    ) -> Reservation:
        """Take the brand's next `n` slots if the first is within `max_wait` seconds; with
        `first`, take them now, ahead of the brand's queue (see RESERVE_LUA)."""
        wait = self.policy.short_wait if max_wait is None else max_wait
        ok, start, step = self._reserve(
            args=[
                keys.rate_prefix(brand),
                n,
                repr(self.clock()),
                *self.policy.lua_args(),
                wait,
                "1" if first else "0",
            ]
        )
        return Reservation(bool(int(ok)), float(start), float(step))

    def pause(self, brand: str, seconds: float) -> None:
        """A 429: no call of this brand, from any process, for `seconds`."""
        self._pause(args=[keys.rate_prefix(brand), repr(self.clock()), repr(max(seconds, 0.001))])

    def paused_until(self, brand: str) -> float | None:
        value = self.redis.get(keys.rate_prefix(brand) + "pause")
        return float(value) if value is not None and float(value) > self.clock() else None

    def take(self, brand: str, now: float) -> float | None:
        """Count the call about to go at `now`; None if it may go, else when a call leaves
        the window."""
        ok, when = self._take(
            args=[
                keys.rate_prefix(brand),
                repr(now),
                repr(self.policy.window),
                self.policy.limit,
                f"{now:.6f}:{secrets.token_hex(4)}",
            ]
        )
        return None if int(ok) else float(when)

    def observe(self, brand: str, rate: RateLimitInfo, sent: float) -> None:
        """After a response to the call taken at `sent`: learn others' use of the budget."""
        if rate.remaining is None:
            return
        limit = min(self.policy.limit, rate.limit) if rate.limit else self.policy.limit
        args = [keys.rate_prefix(brand), repr(sent), repr(self.policy.window)]
        self._observe(args=[*args, limit, rate.remaining])

    def snapshot(self, brand: str) -> dict[str, float | int | None]:
        """The brand's limiter state, for `fiscal-worker stats` and metrics."""
        prefix = keys.rate_prefix(brand)
        tat, pause, others = self.redis.mget(prefix + "tat", prefix + "pause", prefix + "others")
        now = self.clock()
        calls = self.redis.zcount(prefix + "calls", now - self.policy.window, "+inf")
        return {
            "limit": self.policy.limit,
            "window_seconds": self.policy.window,
            "others_estimate": int(float(others)) if others else 0,
            "calls_in_window": int(calls),
            "backlog_seconds": round(max(0.0, float(tat) - now), 3) if tat else 0.0,
            "paused_for_seconds": round(float(pause) - now, 3)
            if pause and float(pause) > now
            else None,
        }


# KEYS: the auth TAT. ARGV: now, step, tolerance, max_wait. GCRA with a burst tolerance:
# a call may go up to `tolerance` seconds ahead of the steady pace.
_AUTH_RESERVE = """
local now, step, tol = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local base = math.max(tat, now)
local go = math.max(now, base - tol)
if go - now > tonumber(ARGV[4]) then return {0, string.format('%.6f', go)} end
local ms = math.ceil((base + step - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.6f', base + step), 'PX', ms)
return {1, string.format('%.6f', go)}
"""


class AuthBudget:
    """The deployment's /v2/auth calls: AUTH_PER_MINUTE on average, bursts of AUTH_BURST.

    Clopos allows 60 auth calls per minute per IP; at 30/min with a burst of 3 the worst
    minute has 33, and the token refreshes of many brands are spread 2 s apart.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        per_minute: int = AUTH_PER_MINUTE,
        burst: int = AUTH_BURST,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.step = 60.0 / per_minute
        self.tolerance = self.step * max(0, burst - 1)
        self.clock = clock
        self._reserve = redis_client.register_script(_AUTH_RESERVE)

    def reserve(self, max_wait: float = AUTH_MAX_WAIT_SECONDS) -> Reservation:
        """The moment this auth call may go (ok), or when it could (not ok, nothing taken)."""
        ok, go = self._reserve(
            keys=[keys.AUTH_RATE],
            args=[repr(self.clock()), repr(self.step), repr(self.tolerance), max_wait],
        )
        return Reservation(bool(int(ok)), float(go), self.step)
