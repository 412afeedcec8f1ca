"""The per-process objects (Redis, HTTP client, token provider, stores), built once per pid.

Prefork children build their own after the fork: sockets are never shared across processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from worker.audit import AuditTrail
from worker.audit_events import AuditEvents
from worker.breaker import CircuitBreaker, FailedCallGuard
from worker.clopos.auth import AuthCaller
from worker.clopos.client import CloposClient
from worker.clopos.tokens import TokenProvider, refresh_lock_seconds
from worker.clopos.wire import Wire
from worker.dlq import DeadLetterStore
from worker.errors import RateLimitInfo
from worker.pipeline import Fiscaliser
from worker.ratelimit import AuthBudget, BrandBudget, RatePolicy
from worker.redis_conn import redis_client
from worker.retry import RetryPolicy
from worker.settings import Settings, get_settings
from worker.store import ResultStore
from worker.telemetry import Telemetry


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: ResultStore
    dlq: DeadLetterStore
    audit: AuditTrail
    events: AuditEvents
    client: CloposClient
    tokens: TokenProvider
    fiscaliser: Fiscaliser

    def close(self) -> None:
        self.client.close()


def build_runtime(settings: Settings) -> Runtime:
    r = redis_client(settings)
    credentials = settings.clopos_credentials()
    wire = Wire(
        settings.clopos_base_url,
        timeout=settings.http_timeout_seconds,
        connect_timeout=settings.http_connect_timeout_seconds,
        on_answer=Telemetry(r).api_answer,
    )
    auth_budget = AuthBudget(r, settings.auth_calls_per_minute)
    auth = AuthCaller(
        wire,
        integrator_id=settings.clopos_integrator_id or "",
        credentials=credentials,
        on_rate=auth_budget.observe,
    )
    rate = rate_policy(settings)
    budget = BrandBudget(r, rate)
    guard = FailedCallGuard(r, settings.failed_calls_per_minute)
    breaker = CircuitBreaker(
        r,
        threshold=settings.breaker_failure_threshold,
        cooldown=settings.breaker_cooldown_seconds,
        max_cooldown=settings.breaker_max_cooldown_seconds,
    )

    def on_response(brand: str, method: str, status: int | None, info: RateLimitInfo) -> None:
        if status is not None and status >= 400:  # what Clopos' flood guard counts
            guard.record_failure()

    tokens = TokenProvider(
        r,
        auth.authenticate,
        auth_budget=auth_budget,
        lock_seconds=refresh_lock_seconds(
            settings.http_connect_timeout_seconds, settings.http_timeout_seconds
        ),
    )
    client = CloposClient(wire, tokens, on_response=on_response)
    store = ResultStore(
        r,
        lifetime=result_lifetime(settings),
        rate=rate,
        queue_lease=settings.queue_lease_seconds,
        run_lease=settings.run_lease_seconds,
        publish_lease=settings.worker_lease_seconds,
    )
    dlq = DeadLetterStore(
        r, warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
    )
    audit = AuditTrail.from_settings(r, settings)
    events = AuditEvents(settings.audit_events_file)
    policy = RetryPolicy(
        transient_window=settings.transient_retry_window_seconds,
        not_ready_window=settings.not_ready_retry_window_seconds,
        base=settings.retry_base_seconds,
        transient_cap=settings.retry_max_delay_seconds,
        not_ready_cap=settings.not_ready_max_delay_seconds,
    )
    fiscaliser = Fiscaliser(
        redis_client=r,
        store=store,
        client=client,
        credentials=credentials,
        dlq=dlq,
        audit=audit,
        events=events,
        policy=policy,
        budget=budget,
        breaker=breaker,
        guard=guard,
        lock_seconds=settings.receipt_lock_seconds,
    )
    return Runtime(settings, r, store, dlq, audit, events, client, tokens, fiscaliser)


def rate_policy(settings: Settings) -> RatePolicy:
    return RatePolicy(
        limit=settings.rate_limit_requests,
        window=settings.rate_limit_window_seconds,
        margin=settings.rate_limit_margin,
    )


def result_lifetime(settings: Settings) -> float:
    """Seconds from a result's first sight to its deadline: FISCAL_RESULT_DEADLINE_SECONDS,
    by default the longer retry window."""
    if settings.result_deadline_seconds is not None:
        return settings.result_deadline_seconds
    return max(settings.transient_retry_window_seconds, settings.not_ready_retry_window_seconds)


_lock = threading.Lock()
_runtimes: dict[int, Runtime] = {}


def _new_lock_after_fork() -> None:
    # A prefork child is forked while a service thread may hold the lock: it gets a fresh one.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def get_runtime() -> Runtime:
    pid = os.getpid()
    with _lock:
        runtime = _runtimes.get(pid)
        if runtime is None:
            runtime = _runtimes[pid] = build_runtime(get_settings())
        return runtime
