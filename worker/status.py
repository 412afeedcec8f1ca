"""What the deployment is doing, read from Redis: for `fiscal-worker stats` and the metrics.

Everything here is read-only and cheap (a handful of commands per brand), so it can run on
every Prometheus scrape. No secret is read: the token cache is not touched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis

from worker import keys
from worker.breaker import CircuitBreaker
from worker.dlq import DeadLetterStore
from worker.ratelimit import BrandBudget, RatePolicy
from worker.redis_conn import is_evicting, maxmemory_policy
from worker.settings import Settings, SettingsError


def known_brands(redis_client: redis.Redis, settings: Settings) -> list[str]:
    """Brands with credentials, plus any brand with budget or breaker state in Redis."""
    brands: set[str] = set()
    with contextlib.suppress(SettingsError):  # stats work without credentials
        brands.update(settings.clopos_credentials())
    for pattern in (keys.rate_tat("*"), keys.breaker("*")):
        for key in redis_client.scan_iter(match=pattern, count=500):
            brand = keys.brand_of(key)
            if brand:
                brands.add(brand)
    return sorted(brands)


def redis_state(redis_client: redis.Redis) -> dict[str, Any]:
    """The memory settings that decide whether Redis may lose the worker's state."""
    try:
        memory = redis_client.info("memory")
    except redis.ResponseError:
        memory = {}
    policy = maxmemory_policy(redis_client)
    return {
        "maxmemory_policy": policy,
        "evicting": is_evicting(policy),
        "used_memory": int(memory.get("used_memory", 0) or 0),
        "maxmemory": int(memory.get("maxmemory", 0) or 0),  # 0 = no limit
    }


def collect(redis_client: redis.Redis, settings: Settings) -> dict[str, Any]:
    now = time.time()
    policy = RatePolicy(
        limit=settings.rate_limit_requests,
        window=settings.rate_limit_window_seconds,
        margin=settings.rate_limit_margin,
    )
    budget = BrandBudget(redis_client, policy)
    breaker = CircuitBreaker(redis_client)
    try:
        pending = redis_client.xpending(settings.ingest_stream, keys.INGEST_GROUP)
        pending_entries = int(pending["pending"])
    except redis.ResponseError:
        pending_entries = 0  # no group yet: no worker has run
    counters = {k: int(v) for k, v in redis_client.hgetall(keys.COUNTERS).items()}
    return {
        "redis": redis_state(redis_client),
        # alive: a heartbeat within the lease of the results a worker holds
        "workers": int(
            redis_client.zcount(keys.WORKERS, now - settings.worker_lease_seconds, "+inf")
        ),
        "results": {
            "unfinished": int(redis_client.zcard(keys.SCHEDULE)),
            "due": int(redis_client.zcount(keys.SCHEDULE, "-inf", now)),
            "celery_queue": int(redis_client.llen(keys.CELERY_QUEUE)),
            "stream_length": int(redis_client.xlen(settings.ingest_stream)),
            "stream_pending": pending_entries,
        },
        "counters": counters,
        "dead_letters": DeadLetterStore(
            redis_client, warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
        ).stats(),
        "brands": {
            brand: {"budget": budget.snapshot(brand), "breaker": breaker.state(brand)}
            for brand in known_brands(redis_client, settings)
        },
    }
