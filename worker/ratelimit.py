"""One request budget per brand, shared by every worker process: a scheduling limiter.

    RatePolicy(limit=300, window=60, margin=0.01, lead=1.0, short_wait=2.0)

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
The auth budget (60/min per IP at Clopos) is a second, global limiter (AuthBudget).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker import keys, scripts
from worker.errors import RateLimitInfo

LIMIT = 300  # requests per window and brand: Clopos' budget
WINDOW_SECONDS = 60.0
CALLS_PER_RESULT = 2  # GET + PATCH
MARGIN = 0.01  # planned below the nominal budget: 297 of 300; the window guard keeps the rest
LEAD_SECONDS = 1.0
SHORT_WAIT_SECONDS = 2.0
AUTH_IP_LIMIT = 60  # Clopos' /v2/auth calls per minute per client IP
AUTH_PER_MINUTE = 45  # ours of them; a burst may take them all at once; the rest is others'
AUTH_WINDOW_SECONDS = 60.0
AUTH_MAX_WAIT_SECONDS = 10.0


def reserve_keys(brand: str) -> list[str]:
    """The brand's rate keys as reserve() takes them (worker/scripts/ratelimit_reserve_fn.lua):
    tat, front, pause, others. Used by BrandBudget.reserve and by admission (worker/store.py)."""
    return [
        keys.rate_tat(brand),
        keys.rate_front(brand),
        keys.rate_pause(brand),
        keys.rate_others(brand),
    ]


@dataclass(frozen=True)
class Reservation:
    ok: bool
    start: float  # when the first slot is (or would be)
    step: float  # interval between the slots


@dataclass(frozen=True)
class RatePolicy:
    limit: int = LIMIT
    window: float = WINDOW_SECONDS
    margin: float = MARGIN
    lead: float = LEAD_SECONDS
    short_wait: float = SHORT_WAIT_SECONDS

    def limit_for(self, rate: RateLimitInfo | None) -> int:
        """The limit an answer's RateLimit-Remaining counts down from: ours, or the API's
        RateLimit-Limit if that is lower."""
        if rate is not None and rate.limit:
            return min(self.limit, rate.limit)
        return self.limit

    def lua_args(self) -> list[str]:
        """limit, window, margin, as ratelimit_reserve and store_admit take them."""
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
        self._reserve = redis_client.register_script(scripts.load("ratelimit_reserve"))
        self._pause = redis_client.register_script(scripts.load("ratelimit_pause"))
        self._observe = redis_client.register_script(scripts.load("ratelimit_observe"))
        self._take = redis_client.register_script(scripts.load("ratelimit_take"))

    def reserve(
        self, brand: str, n: int = 1, max_wait: float | None = None, *, first: bool = False
    ) -> Reservation:
        """Take the brand's next `n` slots if the first is within `max_wait` seconds; with
        `first`, take them now, ahead of the brand's queue (ratelimit_reserve_fn.lua)."""
        wait = self.policy.short_wait if max_wait is None else max_wait
        ok, start, step = self._reserve(
            keys=reserve_keys(brand),
            args=[
                n,
                repr(self.clock()),
                *self.policy.lua_args(),
                wait,
                "1" if first else "0",
            ],
        )
        return Reservation(bool(int(ok)), float(start), float(step))

    def pause(self, brand: str, seconds: float) -> None:
        """A 429: no call of this brand, from any process, for `seconds`."""
        self._pause(
            keys=[keys.rate_pause(brand), keys.rate_tat(brand)],
            args=[repr(self.clock()), repr(max(seconds, 0.001))],
        )

    def paused_until(self, brand: str) -> float | None:
        value = self.redis.get(keys.rate_pause(brand))
        return float(value) if value is not None and float(value) > self.clock() else None

    def take(self, brand: str, now: float) -> float | None:
        """Count the call about to go at `now`; None if it may go, else when a call leaves
        the window."""
        ok, when = self._take(
            keys=[keys.rate_calls(brand), keys.rate_others(brand)],
            args=[
                repr(now),
                repr(self.policy.window),
                self.policy.limit,
                f"{now:.6f}:{secrets.token_hex(4)}",
            ],
        )
        return None if int(ok) else float(when)

    def observe(self, brand: str, rate: RateLimitInfo, sent: float) -> None:
        """After a response to the call taken at `sent`: learn others' use of the budget."""
        if rate.remaining is None:
            return
        self._observe(
            keys=[keys.rate_calls(brand), keys.rate_others(brand)],
            args=[
                repr(sent),
                repr(self.policy.window),
                self.policy.limit_for(rate),
                rate.remaining,
            ],
        )

    def snapshot(self, brand: str) -> dict[str, float | int | None]:
        """The brand's limiter state, for `fiscal-worker stats` and metrics."""
        return self.snapshots([brand])[brand]

    def snapshots(self, brands: list[str]) -> dict[str, dict[str, float | int | None]]:
        """`snapshot` of many brands in one round trip (a scrape reads every brand)."""
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        for brand in brands:
            pipe.mget(keys.rate_tat(brand), keys.rate_pause(brand), keys.rate_others(brand))
            pipe.zcount(keys.rate_calls(brand), now - self.policy.window, "+inf")
        replies = pipe.execute() if brands else []
        found = {}
        for index, brand in enumerate(brands):
            (tat, pause, others), calls = replies[2 * index], replies[2 * index + 1]
            found[brand] = {
                "limit": self.policy.limit,
                "window_seconds": self.policy.window,
                "others_estimate": int(float(others)) if others else 0,
                "calls_in_window": int(calls),
                "backlog_seconds": round(max(0.0, float(tat) - now), 3) if tat else 0.0,
                "paused_for_seconds": round(float(pause) - now, 3)
                if pause and float(pause) > now
                else None,
            }
        return found


class AuthBudget:
    """The deployment's /v2/auth calls: at most `per_minute` in any minute, bursts allowed.

    Clopos allows 60 auth calls per minute per IP, counted over a sliding minute. Many
    brands cold at once (a fresh deployment, a restart after tokens expired) get their
    tokens in one burst of up to `per_minute` (AUTH_PER_MINUTE, 45); the rest of the IP's
    minute (60 - per_minute: 15) is left to whatever else shares the IP: another
    deployment, a tool. The API's own count rules too: an auth answer whose
    RateLimit-Remaining is down to that rest (others used it), or a 429, holds every auth
    call of the deployment until the API's RateLimit-Reset (`observe`).
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        per_minute: int = AUTH_PER_MINUTE,
        *,
        window: float = AUTH_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.per_minute = per_minute
        self.others_part = max(0, AUTH_IP_LIMIT - per_minute)
        self.window = window
        self.clock = clock
        self._reserve = redis_client.register_script(scripts.load("ratelimit_auth_reserve"))
        self._hold = redis_client.register_script(scripts.load("ratelimit_auth_hold"))

    def reserve(self, max_wait: float = AUTH_MAX_WAIT_SECONDS) -> Reservation:
        """The moment this auth call may go (ok, booked), or when it could (not ok, nothing
        booked)."""
        ok, go = self._reserve(
            keys=[keys.AUTH_CALLS, keys.AUTH_HOLD],
            args=[
                repr(self.clock()),
                repr(self.window),
                self.per_minute,
                max_wait,
                secrets.token_hex(6),
            ],
        )
        return Reservation(bool(int(ok)), float(go), self.window / self.per_minute)

    def observe(self, rate: RateLimitInfo, *, rejected: bool = False) -> None:
        """An auth answer's headers (`rejected`: it was a 429): at the reserve, or refused,
        hold every auth call until the API's window has room again."""
        if not rejected and (rate.remaining is None or rate.remaining > self.others_part):
            return
        seconds = rate.reset_seconds if rate.reset_seconds is not None else self.window
        seconds = min(max(seconds, 1.0), self.window)
        until = self.clock() + seconds
        self._hold(keys=[keys.AUTH_HOLD], args=[repr(until), math.ceil(seconds * 1000)])
