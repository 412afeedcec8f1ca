"""The deployment's counters, written by every worker process into Redis, read by the exporter.

Every figure lives in Redis, not in a process: prefork children, pods that come and go and a
single exporter per deployment (worker/metrics.py) all see the same numbers, and a counter
survives the restart of whatever incremented it. Writes ride in the pipeline of the step
they count where there is one (a result's outcome, a parked retry), so most cost no extra
round trip; a counter is never worth failing a result for, so a lone write that fails is
logged and dropped (`Telemetry.count`). Counts made where no pipeline runs (an API answer,
at the wire) wait in the process (`buffer`) and ride in the next pipeline the process runs
there (`drain`): the call's own after-call step, the run's outcome, or in the main process
the heartbeat; a process killed or recycled in between loses those few counts, never a
result.

    keys.COUNTERS   one hash of integer counters, by field (the names below; waits in ms)
    keys.LATENCY    the end-to-end latency histogram: per `since`, one field per bucket
                    (not cumulative: the exporter sums them) and its sum
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import weakref
from collections import Counter
from enum import StrEnum

import redis

from worker import keys
from worker.logs import kv

log = logging.getLogger(__name__)

# Seconds; from a fiscal device printing to the PATCH: sub-second when all is well, hours
# through an outage, at most the result's deadline (a day by default).
LATENCY_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400, 86400)

RECEIVED = "received"
PATCHES = "patches"
RETRIES_SCHEDULED = "retries_scheduled"


class RetryClass(StrEnum):
    """Why a result went back to the schedule (`fiscal_retries_total{error_class}`)."""

    TRANSIENT = "transient"  # network, timeout, 5xx, an internal error
    NOT_READY = "not_ready"  # receipt not closed yet, or not found yet
    AUTH = "auth"  # /v2/auth refused the brand's credentials
    RATE_LIMITED = "rate_limited"  # a 429
    CIRCUIT_OPEN = "circuit_open"  # the brand's circuit did not let it call
    BUDGET = "budget"  # its budget slot is later, the brand is paused, the failed-call guard
    RECEIPT_BUSY = "receipt_busy"  # another worker holds the receipt


class Wait(StrEnum):
    """Rate-limit waits (`fiscal_rate_limit_wait_seconds_total{how}`)."""

    SLEPT = "slept"  # a run slept for its slot
    DEFERRED = "deferred"  # a result was parked for a later slot
    PAUSED = "paused"  # a 429's Retry-After paused the brand


class Since(StrEnum):
    """Where the end-to-end latency starts (`fiscal_e2e_latency_seconds{since}`)."""

    STREAM = "stream"  # the stream entry's time (its id)
    PRINTED = "printed"  # the adapter's printed_at


ENDPOINTS = {"GET": "get_receipt", "PATCH": "patch_receipt"}  # receipt calls by method
ENDPOINT_NAMES = ("auth", "get_receipt", "patch_receipt")


def endpoint_of(method: str, path: str) -> str:
    """`auth`, `get_receipt` or `patch_receipt` (a bounded label set, never a receipt id)."""
    if path.endswith("/v2/auth"):
        return "auth"
    return ENDPOINTS.get(method, "other")


# Field names in keys.COUNTERS. The exporter parses them back (worker/metrics.py).
def api_call(endpoint: str, status: int | None) -> str:
    return f"api:{endpoint}:{status if status is not None else 'none'}"


def retry(error_class: RetryClass) -> str:
    return f"retry:{error_class}"


def dead_lettered(reason: str) -> str:
    return f"dead_lettered:{reason}"


def wait_ms(how: Wait) -> str:
    """Milliseconds, so every counter in the hash is an integer."""
    return f"ratelimit_wait_ms:{how}"


def millis(seconds: float) -> int:
    return max(0, round(seconds * 1000))


REFRESH_OUTCOMES = ("ok", "rejected", "failed")  # failed: network, 5xx, no usable token
CIRCUIT_CHANGES = ("opened", "reopened", "closed")  # worker/breaker.py's transitions


def token_refresh(outcome: str) -> str:
    return f"token_refresh:{outcome}"


def circuit(change: str) -> str:
    return f"circuit_{change}"


def entry_time(entry_id: str) -> float | None:
    """Unix seconds a stream entry was added (its id is `<ms>-<seq>`); None if not an id."""
    millis = entry_id.split("-")[0]
    return int(millis) / 1000 if millis.isdigit() else None


def bucket_of(seconds: float) -> int:
    """The index of the first bucket whose bound holds `seconds`; len(LATENCY_BUCKETS): +Inf."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


def observe_latency(pipe: redis.client.Pipeline, since: Since, seconds: float) -> None:
    seconds = max(0.0, seconds)
    pipe.hincrby(keys.LATENCY, f"{since}:{bucket_of(seconds)}", 1)
    pipe.hincrbyfloat(keys.LATENCY, f"{since}:sum", round(seconds, 6))


# Counts waiting for a pipeline, per Redis (its connection pool): they go only to the Redis
# they were counted for.
_buffered: weakref.WeakKeyDictionary[object, Counter[str]] = weakref.WeakKeyDictionary()
_buffer_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A prefork child starts with none of its parent's counts (they are the parent's to
    # write) and a fresh lock (a service thread may have held it at the fork).
    global _buffer_lock
    _buffer_lock = threading.Lock()
    _buffered.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def buffer(redis_client: redis.Redis, field: str, amount: int = 1) -> None:
    """Count `field` into `redis_client`'s Redis with the next pipeline run there (`drain`)."""
    with _buffer_lock:
        _buffered.setdefault(redis_client.connection_pool, Counter())[field] += amount


def drain(pipe: redis.client.Pipeline) -> None:
    """Queue the counts buffered for `pipe`'s Redis on it. They are taken out of the buffer
    now: if `pipe` then fails they are lost (logged by whoever runs it), a count, not a
    result."""
    with _buffer_lock:
        counts = _buffered.pop(pipe.connection_pool, None)
    for field, amount in (counts or {}).items():
        pipe.hincrby(keys.COUNTERS, field, amount)


class Telemetry:
    """Counters written on their own (no pipeline of a step to ride in)."""

    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client

    def count(self, field: str, amount: int = 1) -> None:
        try:
            self.redis.hincrby(keys.COUNTERS, field, amount)
        except redis.RedisError as exc:  # a lost count, not a lost result
            log.warning(kv("counter_lost", field=field, error=exc.__class__.__name__))

    def api_answer(self, method: str, path: str, status: int | None) -> None:
        """The wire's hook: one answer (or none: a timeout, a lost connection) from Clopos,
        counted with the next pipeline of this process (the call's after-call step)."""
        buffer(self.redis, api_call(endpoint_of(method, path), status))
