"""RetryPolicy: full-jitter backoff bounded by the windows; 429 waits are not failures."""

import random

from worker.retry import RetryPolicy

POLICY = RetryPolicy(
    transient_window=100, not_ready_window=50, base=1, transient_cap=30, not_ready_cap=8
)


def test_backoff_ceiling_doubles_and_is_capped():
    rng = random.Random(1)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 30)]:
        delays = [POLICY.backoff(failures, 30, rng) for _ in range(200)]
        assert min(delays) >= POLICY.floor
        assert max(delays) <= max(ceiling, POLICY.floor)
        if ceiling >= 4:
            assert max(delays) > ceiling / 2  # jitter spreads over the whole range


def test_transient_retry_stays_inside_the_window_then_gives_up():
    retry = POLICY.transient(failures=20, since=0, now=90)
    assert retry.due is not None and 90 < retry.due <= 100
    assert POLICY.transient(failures=20, since=0, now=100).due is None


def test_not_ready_uses_its_own_window_and_cap():
    retry = POLICY.not_ready(failures=10, since=0, now=10)
    assert retry.due is not None and retry.due <= 10 + 8
    assert POLICY.not_ready(failures=1, since=0, now=50).due is None


def test_auth_is_bounded_by_attempts():
    assert POLICY.auth(POLICY.auth_max_attempts - 1, now=0).due is not None
    assert POLICY.auth(POLICY.auth_max_attempts, now=0).due is None


def test_rate_limit_wait_is_what_the_server_asked_plus_a_little():
    waits = [POLICY.rate_limit_wait(7) for _ in range(100)]
    assert all(7 <= w <= 7.5 for w in waits)


def test_backoff_after_thousands_of_failures_stays_finite_and_capped():
    # 2 ** 1024 overflows a float: a result failing for days must still get a delay.
    for failures in (1_025, 10_000, 10**9):
        assert POLICY.floor <= POLICY.backoff(failures, 30) <= 30
    assert POLICY.transient(failures=5_000, since=0, now=10).due is not None
