"""One access token per brand, shared by every worker process through Redis.

    reuse      a cached token is used until less than min(60 s, 10% of its lifetime) remains
    refresh    one process at a time, under a Redis lock that outlives the longest
               refresh (`refresh_lock_seconds`: the auth-budget wait plus the auth call's
               timeouts), so two processes never refresh one brand at once; the others
               wait for the new token (polling every POLL_SECONDS, a little longer than
               the lock) instead of calling /v2/auth themselves: 20 processes starting at
               once make one call
    budget     each /v2/auth call takes a slot of the deployment's auth budget
               (worker/ratelimit.AuthBudget); a slot too far away defers the caller
    rejected   a rejected auth is remembered for FAILURE_MEMORY_SECONDS, so waiting
               processes fail fast instead of each spending the 60/min auth budget
    invalidate on any auth-class answer the caller drops the token it used (compare and
               delete: a newer token another process just fetched is kept)
    in process a token read from Redis (or fetched) is used from the process's memory for
               up to LOCAL_HOLD_SECONDS (and never past its refresh margin), so a call
               costs no Redis read for it; a token deleted from Redis (an operator
               switching tokens, another process's 401) is out of every process by then

The token lives in Redis under keys.token(brand) with a TTL no longer than its life; the
client_secret never reaches Redis.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable

import redis

from worker import keys, scripts, telemetry
from worker.clopos.auth import Token
from worker.clopos.wire import CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS
from worker.errors import AuthError, Deferred, TransientError
from worker.logs import kv, register_secret
from worker.ratelimit import AUTH_MAX_WAIT_SECONDS, AuthBudget
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

REUSE_MARGIN_CAP = 60.0  # refresh when less than min(this, 10% of the lifetime) remains
REUSE_MARGIN_FRACTION = 0.10
WAIT_SLACK_SECONDS = 5.0  # waiters wait this much longer than the refresh lock lives
POLL_SECONDS = 0.05
FAILURE_MEMORY_SECONDS = 10.0
LOCAL_HOLD_SECONDS = 30.0  # a token read from Redis is used from memory this long at most


def refresh_lock_seconds(connect_timeout: float, timeout: float) -> float:
    """How long one refresh can take at most: the wait for an auth-budget slot, then one
    /v2/auth request with httpx's per-phase timeouts (pool, connect, write, read), plus a
    second of slack."""
    return AUTH_MAX_WAIT_SECONDS + connect_timeout + 3 * timeout + 1.0


def reuse_margin(lifetime: float) -> float:
    return min(REUSE_MARGIN_CAP, REUSE_MARGIN_FRACTION * lifetime)


def is_fresh(token: Token, now: float) -> bool:
    return token.expires_at - now > reuse_margin(token.lifetime)


class TokenProvider:
    def __init__(
        self,
        redis_client: redis.Redis,
        authenticate: Callable[[str], Token],
        *,
        auth_budget: AuthBudget | None = None,
        lock_seconds: float = refresh_lock_seconds(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = redis_client
        self.auth_budget = auth_budget
        self.authenticate = authenticate
        self.lock_seconds = lock_seconds
        self.wait_seconds = lock_seconds + WAIT_SLACK_SECONDS
        self.clock = clock
        self.sleep = sleep
        self._unlock = redis_client.register_script(scripts.load("tokens_unlock"))
        self._drop = redis_client.register_script(scripts.load("tokens_drop_if_current"))
        # brand -> (the token this process uses, until when without asking Redis)
        self._local: dict[str, tuple[Token, float]] = {}

    def has(self, brand: str) -> bool:
        """Whether this process holds a fresh token of the brand (a `get` costs nothing)."""
        return self._held(brand) is not None

    def get(self, brand: str) -> str:
        local = self._held(brand)
        if local is not None:
            return local.value
        deadline = self.clock() + self.wait_seconds
        while True:
            cached = self._cached(brand)
            if cached is not None:
                return cached.value
            self._raise_remembered_failure(brand)
            owner = secrets.token_hex(8)
            lock_key = keys.token_refresh_lock(brand)
            if self.redis.set(lock_key, owner, nx=True, px=int(self.lock_seconds * 1000)):
                try:
                    return self._refresh(brand)
                finally:
                    self._unlock(keys=[lock_key], args=[owner])
            if self.clock() >= deadline:
                raise TransientError(
                    f"timed out waiting for another process's token refresh of {brand}"
                )
            self.sleep(POLL_SECONDS)

    def invalidate(self, brand: str, token: str) -> None:
        local = self._local.get(brand)
        if local is not None and local[0].value == token:
            self._local.pop(brand, None)
        if self._drop(keys=[keys.token(brand)], args=[token]):
            log.info(kv("token_invalidated", brand=brand))

    def _held(self, brand: str) -> Token | None:
        local = self._local.get(brand)
        if local is None:
            return None
        token, until = local
        now = self.clock()
        return token if now < until and is_fresh(token, now) else None

    def _hold(self, brand: str, token: Token) -> None:
        self._local[brand] = (token, self.clock() + LOCAL_HOLD_SECONDS)

    def _cached(self, brand: str) -> Token | None:
        raw = self.redis.get(keys.token(brand))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            token = Token(doc["token"], float(doc["expires_at"]), float(doc["lifetime"]))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable cache entry: refresh replaces it
        if not is_fresh(token, self.clock()):
            return None
        register_secret(token.value)
        self._hold(brand, token)
        return token

    def _refresh(self, brand: str) -> str:
        cached = self._cached(brand)  # someone may have refreshed while we took the lock
        if cached is not None:
            return cached.value
        self._await_auth_slot(brand)
        try:
            token = self.authenticate(brand)
        except AuthError as exc:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(
                keys.token_auth_failure(brand),
                str(exc)[:500],
                px=int(FAILURE_MEMORY_SECONDS * 1000),
            )
            pipe.hincrby(keys.COUNTERS, telemetry.token_refresh("rejected"), 1)
            pipe.execute()
            raise
        except Exception:
            Telemetry(self.redis).count(telemetry.token_refresh("failed"))
            raise
        ttl = token.expires_at - self.clock()
        pipe = self.redis.pipeline(transaction=False)
        if ttl > 0:
            doc = {"token": token.value, "expires_at": token.expires_at, "lifetime": token.lifetime}
            pipe.set(keys.token(brand), json.dumps(doc), px=max(1, int(ttl * 1000)))
            pipe.delete(keys.token_auth_failure(brand))
        pipe.hincrby(keys.COUNTERS, telemetry.token_refresh("ok"), 1)
        pipe.execute()
        if ttl > 0:
            self._hold(brand, token)
        log.info(kv("token_refreshed", brand=brand, lifetime=int(token.lifetime)))
        return token.value

    def _await_auth_slot(self, brand: str) -> None:
        """Spread /v2/auth calls of all brands over the deployment's auth budget."""
        if self.auth_budget is None:
            return
        slot = self.auth_budget.reserve()
        if not slot.ok:
            raise Deferred(slot.start, f"auth budget: next /v2/auth slot for {brand} is later")
        wait = slot.start - self.clock()
        if wait > 0:
            self.sleep(wait)

    def _raise_remembered_failure(self, brand: str) -> None:
        remembered = self.redis.get(keys.token_auth_failure(brand))
        if remembered is not None:
            raise AuthError(
                f"auth recently rejected: {remembered}", error_code="auth_recently_failed"
            )
