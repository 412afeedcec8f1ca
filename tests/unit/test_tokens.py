"""TokenProvider with fakeredis: reuse, the refresh margin, one refresh under the lock,
invalidate only the rejected token, remembered rejections, TTL no longer than the token."""

from __future__ import annotations

import json
import threading

import pytest
from support import Clock

from worker import keys
from worker.clopos.auth import Token
from worker.clopos.tokens import TokenProvider, is_fresh, refresh_lock_seconds, reuse_margin
from worker.errors import AuthError, TransientError
from worker.ratelimit import AUTH_MAX_WAIT_SECONDS


class Auth:
    def __init__(self, clock: Clock, lifetime: float = 3600.0, fail: bool = False) -> None:
        self.clock, self.lifetime, self.fail = clock, lifetime, fail
        self.calls = 0

    def __call__(self, brand: str) -> Token:
        self.calls += 1
        if self.fail:
            raise AuthError("bad credentials", http_status=401)
        return Token(f"tok-{brand}-{self.calls}", self.clock() + self.lifetime, self.lifetime)


def test_margin_is_min_of_60s_and_10_percent():
    assert reuse_margin(3600) == 60
    assert reuse_margin(300) == 30
    assert is_fresh(Token("t", 1000 + 61, 3600), 1000)
    assert not is_fresh(Token("t", 1000 + 59, 3600), 1000)


def test_token_is_reused_until_the_margin_then_refreshed_once(r, clock):
    auth = Auth(clock)
    provider = TokenProvider(r, auth, clock=clock)
    first = provider.get("b1")
    assert [provider.get("b1") for _ in range(5)] == [first] * 5
    clock.now += 3600 - 61
    assert provider.get("b1") == first
    clock.now += 2  # 59 s left < 60 s margin
    second = provider.get("b1")
    assert second != first
    assert auth.calls == 2


def test_token_stored_with_ttl_no_longer_than_its_life_and_no_secret(r, clock):
    provider = TokenProvider(r, Auth(clock, lifetime=300), clock=clock)
    provider.get("b1")
    ttl_ms = r.pttl(keys.token("b1"))
    assert 0 < ttl_ms <= 300_000
    doc = json.loads(r.get(keys.token("b1")))
    assert set(doc) == {"token", "expires_at", "lifetime"}
    assert "token" in keys.token("b1")


def test_invalidate_drops_only_the_rejected_token(r, clock):
    auth = Auth(clock)
    provider = TokenProvider(r, auth, clock=clock)
    first = provider.get("b1")
    provider.invalidate("b1", "some-older-token")
    assert provider.get("b1") == first  # a newer token than the rejected one is kept
    provider.invalidate("b1", first)
    assert provider.get("b1") != first
    assert auth.calls == 2


def test_rejected_auth_is_remembered_so_others_fail_fast(r, clock):
    auth = Auth(clock, fail=True)
    provider = TokenProvider(r, auth, clock=clock)
    with pytest.raises(AuthError):
        provider.get("b1")
    with pytest.raises(AuthError) as caught:
        TokenProvider(r, auth, clock=clock).get("b1")
    assert caught.value.error_code == "auth_recently_failed"
    assert auth.calls == 1


def test_waiters_do_not_call_auth_while_another_refreshes(r, clock):
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_auth(brand: str) -> Token:
        calls.append(brand)
        started.set()
        release.wait(5)
        return Token("tok-slow", clock() + 3600, 3600)

    results: list[str] = []
    holder = threading.Thread(
        target=lambda: results.append(TokenProvider(r, slow_auth, clock=clock).get("b1"))
    )
    holder.start()
    assert started.wait(5)
    waiters = [
        threading.Thread(
            target=lambda: results.append(TokenProvider(r, slow_auth, clock=clock).get("b1"))
        )
        for _ in range(5)
    ]
    for w in waiters:
        w.start()
    release.set()
    for t in [holder, *waiters]:
        t.join(10)
    assert results == ["tok-slow"] * 6
    assert calls == ["b1"]


def test_waiting_too_long_for_another_refresh_is_transient(r, clock):
    r.set(keys.token_refresh_lock("b1"), "someone-else", px=600_000)
    provider = TokenProvider(
        r,
        Auth(clock),
        lock_seconds=2.0,
        clock=clock,
        sleep=lambda s: setattr(clock, "now", clock.now + s),
    )
    with pytest.raises(TransientError):
        provider.get("b1")
    assert clock.now - 1_000_000.0 >= 2.0  # it waited at least as long as a refresh may take


def test_the_refresh_lock_outlives_the_longest_refresh(r):
    # The longest refresh: an auth-budget wait, then one /v2/auth with its timeouts.
    assert refresh_lock_seconds(5.0, 12.0) >= AUTH_MAX_WAIT_SECONDS + 5.0 + 12.0
    seen = []

    def authenticate(brand: str) -> Token:
        seen.append(r.pttl(keys.token_refresh_lock(brand)))
        return Token("tok-1", 1e12, 3600.0)

    TokenProvider(r, authenticate, lock_seconds=refresh_lock_seconds(5.0, 12.0)).get("b1")
    assert seen and seen[0] > (AUTH_MAX_WAIT_SECONDS + 5.0 + 12.0) * 1000


def test_a_token_held_in_the_process_costs_no_redis_read(r, clock):
    provider = TokenProvider(r, Auth(clock), clock=clock)
    first = provider.get("b1")
    r.delete(keys.token("b1"))  # gone from Redis (another process dropped it after a 401)
    assert provider.has("b1") and provider.get("b1") == first  # used until its own 401
    provider.invalidate("b1", first)
    assert not provider.has("b1") and provider.get("b1") != first


def test_a_token_read_from_redis_is_held_until_its_refresh_margin(r, clock):
    auth = Auth(clock)
    TokenProvider(r, auth, clock=clock).get("b1")  # another process fetched it
    provider = TokenProvider(r, auth, clock=clock)
    assert not provider.has("b1")
    token = provider.get("b1")
    assert provider.has("b1") and auth.calls == 1
    clock.now += 3600 - 59  # inside the margin: not fresh in the process either
    assert not provider.has("b1") and provider.get("b1") != token


def test_a_token_deleted_from_redis_leaves_every_process_within_the_hold(r, clock):
    from worker.clopos.tokens import LOCAL_HOLD_SECONDS

    auth = Auth(clock)
    provider = TokenProvider(r, auth, clock=clock)
    first = provider.get("b1")
    r.delete(keys.token("b1"))  # an operator switching tokens at once (ops/RUNBOOK.md)
    clock.now += LOCAL_HOLD_SECONDS - 1
    assert provider.get("b1") == first
    clock.now += 2
    assert provider.get("b1") != first and auth.calls == 2
