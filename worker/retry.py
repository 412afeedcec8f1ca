"""When a result that could not be applied is tried again, and when it gives up.

    RetryPolicy(transient_window=86400, not_ready_window=1800, base=1.0,
                transient_cap=300.0, not_ready_cap=60.0, floor=0.5, auth_max_attempts=5)

    base               first backoff ceiling, seconds; doubles per failed attempt
    transient_cap      largest backoff for network errors, timeouts, 5xx
    not_ready_cap      largest backoff while the receipt is missing (404) or still open
    floor              smallest wait, so a storm never becomes a busy loop
    *_window           how long a failure class is retried, counted from its first occurrence;
                       the last try is placed at the window's end, then the result is dead-lettered
    auth_max_attempts  tries while the brand's credentials are rejected

Delays use "full jitter" (uniform between floor and the ceiling) so a fleet that failed
together does not retry together. A 429 is not a failed attempt: it waits what the server
asked (plus a little jitter) and costs nothing here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TRANSIENT_WINDOW_SECONDS = 86_400.0  # an outage of up to a day is waited out
NOT_READY_WINDOW_SECONDS = 1_800.0  # a receipt is closed within half an hour of its print
BASE_SECONDS = 1.0
TRANSIENT_CAP_SECONDS = 300.0  # an outage is probed every 5 min at most
NOT_READY_CAP_SECONDS = 60.0  # a receipt closing late is picked up within a minute
FLOOR_SECONDS = 0.5
AUTH_MAX_ATTEMPTS = 5
RATE_LIMIT_JITTER_SECONDS = 0.5  # spread the fleet after a shared 429 pause
MAX_DOUBLINGS = 62  # far past any cap; keeps 2 ** n a finite float


@dataclass(frozen=True)
class Retry:
    """Try again at `due`; or give up (`due` is None)."""

    due: float | None


@dataclass(frozen=True)
class RetryPolicy:
    transient_window: float = TRANSIENT_WINDOW_SECONDS
    not_ready_window: float = NOT_READY_WINDOW_SECONDS
    base: float = BASE_SECONDS
    transient_cap: float = TRANSIENT_CAP_SECONDS
    not_ready_cap: float = NOT_READY_CAP_SECONDS
    floor: float = FLOOR_SECONDS
    auth_max_attempts: int = AUTH_MAX_ATTEMPTS

    def backoff(self, failures: int, cap: float, rng: random.Random | None = None) -> float:
        """Full-jitter delay after `failures` consecutive failures (1 = the first)."""
        # The exponent is capped: 2.0 ** 1024 overflows a float after ~1,000 failures.
        ceiling = min(cap, self.base * 2.0 ** min(max(0, failures - 1), MAX_DOUBLINGS))
        return (rng or random).uniform(self.floor, max(self.floor, ceiling))

    def transient(self, failures: int, since: float, now: float) -> Retry:
        return self._windowed(failures, since, now, self.transient_window, self.transient_cap)

    def not_ready(self, failures: int, since: float, now: float) -> Retry:
        return self._windowed(failures, since, now, self.not_ready_window, self.not_ready_cap)

    def auth(self, failures: int, now: float) -> Retry:
        if failures >= self.auth_max_attempts:
            return Retry(None)
        return Retry(now + self.backoff(failures, self.transient_cap))

    def rate_limit_wait(self, retry_after: float) -> float:
        return retry_after + random.uniform(0, RATE_LIMIT_JITTER_SECONDS)

    def _windowed(
        self, failures: int, since: float, now: float, window: float, cap: float
    ) -> Retry:
        deadline = since + window
        if now >= deadline:
            return Retry(None)
        return Retry(min(now + self.backoff(failures, cap), deadline))
