"""What the deployment is doing, read from Redis: for `fiscal-worker stats` and the metrics.

Everything here is read-only and cheap, so it can run on every Prometheus scrape: one
pipelined round trip for the deployment, a handful of commands per brand, and nothing that
walks the keyspace (audit records and markers grow to millions of keys). The brands are the
registry the workers keep (keys.BRANDS) plus the ones in this process's credentials. No
secret is read: the token cache is not touched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis

from worker import keys, scripts, telemetry
from worker.breaker import CircuitBreaker
from worker.dlq import DeadLetterStore
from worker.ratelimit import BrandBudget, RatePolicy
from worker.redis_conn import is_evicting, maxmemory_policy
from worker.settings import Settings, SettingsError


def known_brands(registered: list[str], settings: Settings) -> list[str]:
    """The brands some worker had credentials for lately (the registry), plus this
    process's own."""
    brands = set(registered)
    with contextlib.suppress(SettingsError):  # stats work without credentials
        brands.update(settings.clopos_credentials())
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
    stream = settings.ingest_stream
    pipe = redis_client.pipeline(transaction=False)
    pipe.zcount(keys.WORKERS, now - settings.worker_lease_seconds, "+inf")
    pipe.zrange(keys.WORKERS, -1, -1, withscores=True)  # the newest heartbeat
    pipe.zcard(keys.SCHEDULE)
    pipe.zcount(keys.SCHEDULE, "-inf", now)
    pipe.zrange(keys.SCHEDULE, 0, 0, withscores=True)  # the earliest due
    pipe.llen(keys.CELERY_QUEUE)
    pipe.xlen(stream)
    pipe.hgetall(keys.COUNTERS)
    pipe.hgetall(keys.LATENCY)
    pipe.zrangebyscore(keys.BRANDS, now - keys.BRAND_REGISTRY_SECONDS, "+inf")
    oldest_id = redis_client.register_script(scripts.load("ingest_oldest_id"))
    oldest_id(keys=[stream], client=pipe)  # the oldest entry not settled: its id only
    (alive, newest, unfinished, due, earliest, queued, length, counters, latency, registered,
     oldest) = pipe.execute()  # fmt: skip
    brands = known_brands([_text(b) for b in registered], settings)
    budgets, circuits = budget.snapshots(brands), breaker.states(brands)
    try:
        pending = redis_client.xpending(stream, keys.INGEST_GROUP)
        pending_entries = int(pending["pending"])
    except redis.ResponseError:
        pending_entries = 0  # no group yet: no worker has run
    return {
        "redis": redis_state(redis_client),
        # alive: a heartbeat within the lease of the results a worker holds
        "workers": int(alive),
        "newest_heartbeat_age": round(now - newest[0][1], 3) if newest else None,
        "results": {
            "unfinished": int(unfinished),
            "due": int(due),
            # how long the earliest due result has waited past its time (0: none due)
            "oldest_due_seconds": round(max(0.0, now - earliest[0][1]), 3) if earliest else 0.0,
            "celery_queue": int(queued),
            "stream_length": int(length),
            "stream_pending": pending_entries,
            "ingest_lag_seconds": _entry_age(oldest, now),
        },
        "counters": {_text(k): _number(v) for k, v in counters.items()},
        "latency": {_text(k): float(v) for k, v in latency.items()},
        "dead_letters": DeadLetterStore(
            redis_client, warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
        ).stats(),
        "brands": {
            brand: {"budget": budgets[brand], "breaker": circuits[brand]} for brand in brands
        },
    }


def _entry_age(entry_id: Any, now: float) -> float:
    """Seconds since the oldest stream entry was added; 0: none."""
    added = telemetry.entry_time(_text(entry_id)) if entry_id else None
    return round(max(0.0, now - added), 3) if added is not None else 0.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | int:
    text = _text(value)
    return int(text) if text.lstrip("-").isdigit() else float(text)
