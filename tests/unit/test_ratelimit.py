"""The scheduling limiter (GCRA), the 429 pause, the window guard and the pressure estimate,
on fakeredis with a controlled clock."""

from __future__ import annotations

import fakeredis
import pytest
from support import Clock

from worker import keys
from worker.errors import RateLimitInfo
from worker.ratelimit import AuthBudget, BrandBudget, RatePolicy


def test_reservations_are_spaced_by_the_interval(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=300, window=60, margin=0.03), clock=clock)
    starts = [budget.reserve("b", n=2, max_wait=1e9) for _ in range(5)]
    step = 60 / 291  # floor(300 * 0.97)
    assert starts[0].start == pytest.approx(clock.now)
    assert starts[0].step == pytest.approx(step, abs=1e-6)
    for i, res in enumerate(starts):
        assert res.ok and res.start == pytest.approx(clock.now + i * 2 * step, abs=1e-4)


def test_small_budgets_keep_one_call_spare(r):
    budget = BrandBudget(r, RatePolicy(limit=20, window=5, margin=0.03), clock=Clock())
    assert budget.reserve("b").step == pytest.approx(5 / 19, abs=1e-6)


def test_a_reservation_too_far_away_takes_nothing(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=10, window=10, margin=0), clock=clock)
    for _ in range(10):
        budget.reserve("b", max_wait=1e9)
    far = budget.reserve("b", max_wait=2.0)
    assert not far.ok and far.start > clock.now + 2
    again = budget.reserve("b", max_wait=1e9)
    assert again.start == pytest.approx(far.start)  # the refused one did not move the TAT


def test_brands_have_separate_budgets(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=10, window=10), clock=clock)
    for _ in range(50):
        budget.reserve("a", max_wait=1e9)
    assert budget.reserve("b").start == pytest.approx(clock.now)


def test_pause_moves_every_next_slot_after_it(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=300, window=60), clock=clock)
    budget.pause("b", 7)
    assert budget.paused_until("b") == pytest.approx(clock.now + 7)
    assert budget.reserve("b", max_wait=1e9).start == pytest.approx(clock.now + 7)
    clock.now += 8
    assert budget.paused_until("b") is None


def test_take_keeps_one_call_spare_in_the_window(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=5, window=10), clock=clock)
    assert [budget.take("b", clock.now) for _ in range(4)] == [None] * 4
    blocked = budget.take("b", clock.now)
    assert blocked == pytest.approx(clock.now + 10)
    clock.now += 10.001
    assert budget.take("b", clock.now) is None


def test_one_call_of_others_is_taken_for_calls_in_flight(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=20, window=5, margin=0), clock=clock)
    budget.take("b", clock.now)
    # 20 - 18 - 1 (ours) = 1: one of our calls sent after this one, counted first
    budget.observe("b", RateLimitInfo(limit=20, remaining=18, reset_seconds=3), clock.now)
    assert r.get(keys.rate_others("b")) is None
    assert budget.reserve("b").step == pytest.approx(5 / 19)  # planned as with no others


def test_others_use_lowers_capacity_and_the_window_guard(r, clock):
    budget = BrandBudget(r, RatePolicy(limit=20, window=5, margin=0), clock=clock)
    budget.take("b", clock.now)
    # The server says 9 left: 20 - 9 - 1 (ours) = 10 used by another client.
    budget.observe("b", RateLimitInfo(limit=20, remaining=9, reset_seconds=3), clock.now)
    assert r.get(keys.rate_others("b")) == "10"
    assert budget.reserve("b").step == pytest.approx(5 / 9, abs=1e-6)
    taken = [budget.take("b", clock.now) for _ in range(9)]
    assert taken[:8] == [None] * 8 and taken[8] is not None  # 1 + 8 + 10 others = 19


def test_auth_budget_allows_its_minute_at_once_then_waits_for_the_window(r, clock):
    auth = AuthBudget(r, per_minute=45, clock=clock)
    burst = [auth.reserve(max_wait=0) for _ in range(45)]
    assert all(g.ok and g.start == clock.now for g in burst)  # 45 cold brands: all at once
    assert not auth.reserve(max_wait=10).ok  # the 46th: not within the minute
    later = auth.reserve(max_wait=100)
    assert later.ok and later.start == pytest.approx(clock.now + 60)  # when the first leaves
    clock.now += 61
    assert auth.reserve(max_wait=0).ok  # the burst left the window


def test_auth_budget_holds_when_the_api_says_the_rest_is_others(r, clock):
    auth = AuthBudget(r, per_minute=45, clock=clock)
    auth.observe(RateLimitInfo(limit=60, remaining=16, reset_seconds=50))
    assert auth.reserve(max_wait=0).ok  # 16 left: still more than others' 15
    auth.observe(RateLimitInfo(limit=60, remaining=15, reset_seconds=50))
    held = auth.reserve(max_wait=100)
    assert held.ok and held.start == pytest.approx(clock.now + 50)  # not before the reset
    auth.observe(RateLimitInfo(limit=60, remaining=20, reset_seconds=5))
    assert not auth.reserve(max_wait=10).ok  # a later answer never shortens the hold
    clock.now += 51
    assert auth.reserve(max_wait=0).ok


def test_an_auth_429_holds_auth_calls_for_its_reset(r, clock):
    auth = AuthBudget(r, per_minute=45, clock=clock)
    auth.observe(RateLimitInfo(limit=60, remaining=0, reset_seconds=30), rejected=True)
    assert auth.reserve(max_wait=100).start == pytest.approx(clock.now + 30)


def test_results_under_way_go_ahead_of_the_queue_but_at_the_brand_pace():
    from support import Clock

    from worker import keys
    from worker.ratelimit import BrandBudget, RatePolicy

    r, clock = fakeredis.FakeRedis(decode_responses=True), Clock()
    budget = BrandBudget(r, RatePolicy(limit=61, window=60, margin=0), clock=clock)  # 1/s
    assert budget.reserve("b", 100, max_wait=1e9).start == clock.now  # a 100 s backlog
    starts = [budget.reserve("b", first=True).start - clock.now for _ in range(5)]
    assert starts == [0.0, 1.0, 2.0, 3.0, 4.0]  # ahead of the backlog, one step apart
    tat = float(r.get(keys.rate_tat("b")))
    assert tat - clock.now == 105.0  # the queue moved back by as many slots
