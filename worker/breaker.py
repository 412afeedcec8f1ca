"""A circuit breaker per brand, and a guard on failed calls across brands; both shared by
every worker process through Redis.

    CircuitBreaker(threshold=5, cooldown=5.0, max_cooldown=300.0, probe_timeout=30.0)

    closed     calls go; consecutive failures of the brand (5xx, timeouts, network errors,
               rejected auth) are counted, any success resets the count
    open       after `threshold` of them: no call of the brand for `cooldown` seconds; its
               results wait, parked in the schedule, instead of calling
    half-open  then one process (a Redis lock, `probe_timeout`) makes a single probe call;
               success closes the circuit, failure opens it again with the cool-down
               doubled, up to `max_cooldown`

    FailedCallGuard(per_minute=300)

    Clopos blocks an IP for every brand after 600 failed (>= 400) requests a minute. Failed
    calls of all brands are counted per minute; while the last minute's count is at
    `per_minute`, calls of results that failed before (the likely failures: 404s of
    receipts not synced yet, 5xx) wait for the next minute.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker import keys, scripts

THRESHOLD = 5
COOLDOWN_SECONDS = 5.0
MAX_COOLDOWN_SECONDS = 300.0
PROBE_TIMEOUT_SECONDS = 30.0  # longer than one call with its timeouts
FAILED_CALLS_PER_MINUTE = 300  # half of the flood guard's 600

# The breaker hash's layout is keys.BREAKER_* (state, failures, until, cooldown, opened_at):
# written by worker/scripts/breaker_record_fn.lua, read by breaker_allow_fn.lua (both run by
# breaker_*.lua and, on the hot path, by gate_check.lua / gate_record.lua), by state() below
# and by admission (store_admit.lua holds a brand's results while its circuit is open).


@dataclass(frozen=True)
class Permit:
    """May a call of the brand go now? `probe`: it is the single half-open probe."""

    allowed: bool
    probe: bool = False
    wait_until: float | None = None


@dataclass(frozen=True)
class Transition:
    change: str  # '', 'opened', 'reopened', 'closed'
    cooldown: float


class CircuitBreaker:
    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        threshold: int = THRESHOLD,
        cooldown: float = COOLDOWN_SECONDS,
        max_cooldown: float = MAX_COOLDOWN_SECONDS,
        probe_timeout: float = PROBE_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.probe_timeout = probe_timeout
        self.clock = clock
        self._allow = redis_client.register_script(scripts.load("breaker_allow"))
        self._record = redis_client.register_script(scripts.load("breaker_record"))

    def allow(self, brand: str) -> Permit:
        reply = self._allow(
            keys=[keys.breaker(brand), keys.breaker_probe(brand)],
            args=[repr(self.clock()), int(self.probe_timeout * 1000), secrets.token_hex(6)],
        )
        if reply[0] == "closed":
            return Permit(True)
        if reply[0] == "probe":
            return Permit(True, probe=True)
        return Permit(False, wait_until=float(reply[1]))

    def record(self, brand: str, ok: bool, probe: bool = False) -> Transition:
        change, cooldown = self._record(
            keys=[keys.breaker(brand), keys.breaker_probe(brand)],
            args=[
                "1" if ok else "0",
                repr(self.clock()),
                self.threshold,
                repr(self.cooldown),
                repr(self.max_cooldown),
                "1" if probe else "0",
            ],
        )
        return Transition(str(change), float(cooldown))

    def release_probe(self, brand: str) -> None:
        """The probe did not call after all (its slot was later): let another probe."""
        self.redis.delete(keys.breaker_probe(brand))

    def state(self, brand: str) -> dict[str, object]:
        return self.states([brand])[brand]

    def states(self, brands: list[str]) -> dict[str, dict[str, object]]:
        """`state` of many brands in one round trip (a scrape reads every brand)."""
        pipe = self.redis.pipeline(transaction=False)
        for brand in brands:
            pipe.hgetall(keys.breaker(brand))
        replies = pipe.execute() if brands else []
        now = self.clock()
        return {brand: _state(raw, now) for brand, raw in zip(brands, replies, strict=True)}


def _state(raw: dict[str, str], now: float) -> dict[str, object]:
    if not raw or raw.get(keys.BREAKER_STATE) != keys.BREAKER_OPEN:
        failures = int(raw.get(keys.BREAKER_FAILURES, 0)) if raw else 0
        return {"state": "closed", "failures": failures}
    until = float(raw.get(keys.BREAKER_UNTIL, 0))  # none (damaged): half-open, it probes
    return {
        "state": "open" if until > now else "half_open",
        "failures": int(raw.get(keys.BREAKER_FAILURES, 0)),
        "cooldown_seconds": float(raw.get(keys.BREAKER_COOLDOWN, 0)),
        "opens_again_in_seconds": round(max(0.0, until - now), 3),
        # half-open this long: no result of the brand has come to probe it
        "half_open_for_seconds": round(max(0.0, now - until), 3),
    }


class FailedCallGuard:
    def __init__(
        self,
        redis_client: redis.Redis,
        per_minute: int = FAILED_CALLS_PER_MINUTE,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.per_minute = per_minute
        self.clock = clock

    def record_failure(self) -> None:
        minute = int(self.clock() // 60)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(keys.failed_calls(minute))
        pipe.expire(keys.failed_calls(minute), 180)
        pipe.execute()

    def recent(self) -> float:
        """Failed calls in the last 60 s, the previous minute weighted by its overlap."""
        now = self.clock()
        minute = int(now // 60)
        current, previous = self.redis.mget(
            keys.failed_calls(minute), keys.failed_calls(minute - 1)
        )
        overlap = 1.0 - (now % 60) / 60.0
        return int(current or 0) + int(previous or 0) * overlap

    def blocked_until(self) -> float | None:
        """When calls of failing results may go again, or None if they may go now."""
        if self.recent() < self.per_minute:
            return None
        return (int(self.clock() // 60) + 1) * 60.0
