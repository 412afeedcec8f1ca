"""Circuit breaker transitions and the failed-call guard, on fakeredis with a controlled clock."""

from __future__ import annotations

import pytest
from support import Clock

from worker.breaker import CircuitBreaker, FailedCallGuard


def breaker(r, clock):
    return CircuitBreaker(r, threshold=3, cooldown=5, max_cooldown=20, clock=clock)


def test_opens_after_threshold_consecutive_failures(r, clock):
    b = breaker(r, clock)
    assert [b.record("c", ok=False).change for _ in range(3)] == ["", "", "opened"]
    permit = b.allow("c")
    assert not permit.allowed and permit.wait_until == pytest.approx(clock.now + 5)
    assert b.state("c")["state"] == "open"


def test_success_resets_the_count(r):
    b = breaker(r, Clock())
    b.record("c", ok=False)
    b.record("c", ok=False)
    b.record("c", ok=True)
    assert b.record("c", ok=False).change == ""
    assert b.allow("c").allowed


def test_single_probe_after_cooldown_then_close(r, clock):
    b = breaker(r, clock)
    for _ in range(3):
        b.record("c", ok=False)
    clock.now += 5
    first, second = b.allow("c"), b.allow("c")
    assert first.allowed and first.probe
    assert not second.allowed  # only one probe at a time
    assert b.record("c", ok=True, probe=True).change == "closed"
    assert b.allow("c").allowed and not b.allow("c").probe


def test_failed_probe_reopens_with_a_growing_cooldown(r, clock):
    b = breaker(r, clock)
    for _ in range(3):
        b.record("c", ok=False)
    cooldowns = []
    for _ in range(4):
        clock.now += 100
        assert b.allow("c").probe
        change = b.record("c", ok=False, probe=True)
        cooldowns.append(change.cooldown)
    assert cooldowns == [10, 20, 20, 20]


def test_failures_of_calls_in_flight_do_not_extend_an_open_circuit(r, clock):
    b = breaker(r, clock)
    for _ in range(3):
        b.record("c", ok=False)
    assert b.record("c", ok=False).change == ""
    assert b.allow("c").wait_until == pytest.approx(clock.now + 5)


def test_brands_are_independent(r):
    b = breaker(r, Clock())
    for _ in range(3):
        b.record("c", ok=False)
    assert b.allow("d").allowed


def test_failed_call_guard_blocks_at_the_per_minute_bound(r):
    clock = Clock(60 * 1000 + 30)
    guard = FailedCallGuard(r, per_minute=10, clock=clock)
    for _ in range(9):
        guard.record_failure()
    assert guard.blocked_until() is None
    guard.record_failure()
    assert guard.blocked_until() == 60 * 1001
    clock.now += 60  # next minute: the previous one still weighs by its overlap (50%)
    assert guard.recent() == pytest.approx(5)
    assert guard.blocked_until() is None
