"""Prometheus metrics, read from Redis at scrape time (worker/status.py).

Every worker process of every pod writes its counters to Redis (worker/telemetry.py), so
one exporter serves the whole deployment and its figures are right with prefork children
and pods that come and go: `fiscal-worker metrics --serve 9808` (or print once without
--serve). A scrape never walks the keyspace (one pipelined read, a few commands per brand).
The catalogue, with what each figure means, is ops/METRICS.md; in short:

state (gauges)
    fiscal_results_unfinished / _due / _oldest_due_seconds     the schedule (KEDA: _due)
    fiscal_celery_queue_length                                 the Celery queue
    fiscal_ingest_stream_length / _pending, fiscal_ingest_lag_seconds
    fiscal_dead_letters{reason}, _bytes, _over_bound           the dead-letter store
    fiscal_brand_circuit_open / _backlog_seconds / _paused / _others_estimate /
        _calls_in_window {brand}
    fiscal_redis_evicting_policy, _used_memory_bytes, _maxmemory_bytes
    fiscal_workers_alive, fiscal_worker_heartbeat_age_seconds
    fiscal_exporter_collect_seconds
counters
    fiscal_results_ingested_total, fiscal_results_fiscalised_total{how},
    fiscal_results_dead_lettered_total{reason}, fiscal_retries_total{error_class},
    fiscal_api_calls_total{endpoint,status}, fiscal_rate_limit_wait_seconds_total{how},
    fiscal_token_refreshes_total{outcome}, fiscal_circuit_changes_total{change},
    fiscal_events_total{event}
histogram
    fiscal_e2e_latency_seconds{since}                          stream entry / printed_at
                                                               -> PATCH
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker import telemetry
from worker.dlq import REASONS
from worker.pipeline import Kind
from worker.settings import Settings
from worker.status import collect

# (name, key in state["results"], help)
RESULT_GAUGES = (
    ("fiscal_results_unfinished", "unfinished", "Results not fiscalised or dead-lettered yet"),
    ("fiscal_results_due", "due", "Results due now, waiting for a worker"),
    (
        "fiscal_results_oldest_due_seconds",
        "oldest_due_seconds",
        "How long the earliest due result has waited past its time (0: none due)",
    ),
    ("fiscal_celery_queue_length", "celery_queue", "Messages in the Celery queue"),
    ("fiscal_ingest_stream_length", "stream_length", "Ingest stream entries not settled"),
    ("fiscal_ingest_stream_pending", "stream_pending", "Entries read but not settled"),
    (
        "fiscal_ingest_lag_seconds",
        "ingest_lag_seconds",
        "Age of the oldest entry still in the ingest stream (0: empty)",
    ),
)
HOW_FISCALISED = {
    Kind.FISCALISED.value: "patched",
    Kind.ALREADY_DONE.value: "already_done",
    Kind.DUPLICATE.value: "duplicate",
}
OTHER_EVENTS = ("orphans", "unscheduled")

# Every family this exporter serves (without the _total / _bucket suffixes of the text
# format, as prometheus_client names them); the dashboard and alert tests check against it.
METRIC_NAMES = frozenset(
    [name for name, _, _ in RESULT_GAUGES]
    + [
        "fiscal_dead_letters",
        "fiscal_dead_letters_bytes",
        "fiscal_dead_letters_over_bound",
        "fiscal_brand_circuit_open",
        "fiscal_brand_backlog_seconds",
        "fiscal_brand_paused",
        "fiscal_brand_others_estimate",
        "fiscal_brand_calls_in_window",
        "fiscal_redis_evicting_policy",
        "fiscal_redis_used_memory_bytes",
        "fiscal_redis_maxmemory_bytes",
        "fiscal_workers_alive",
        "fiscal_worker_heartbeat_age_seconds",
        "fiscal_exporter_collect_seconds",
        "fiscal_results_ingested",
        "fiscal_results_fiscalised",
        "fiscal_results_dead_lettered",
        "fiscal_retries",
        "fiscal_api_calls",
        "fiscal_rate_limit_wait_seconds",
        "fiscal_token_refreshes",
        "fiscal_circuit_changes",
        "fiscal_events",
        "fiscal_e2e_latency_seconds",
    ]
)


class RedisStateCollector(Collector):
    def __init__(self, redis_client: redis.Redis, settings: Settings) -> None:
        self.redis = redis_client
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        state = collect(self.redis, self.settings)
        took = time.perf_counter() - started
        yield from _state_gauges(state, self.settings)
        yield from _counters(state["counters"])
        yield from _latency(state["latency"])
        yield GaugeMetricFamily(
            "fiscal_exporter_collect_seconds", "How long this scrape's reads took", value=took
        )


def _blocks_calls(breaker: dict[str, Any], settings: Settings) -> bool:
    """Open, or half-open while its probe is still to come. The brand's waiting results are
    spread over at most the longest cool-down, so a circuit half-open longer than that has
    no result left to probe it: it blocks nothing (its next result probes at once)."""
    if breaker["state"] == "open":
        return True
    half_open_for = breaker.get("half_open_for_seconds", 0.0)
    return breaker["state"] == "half_open" and half_open_for <= (
        settings.breaker_max_cooldown_seconds
    )


def _state_gauges(state: dict[str, Any], settings: Settings) -> Iterator[Metric]:
    results = state["results"]
    for name, key, text in RESULT_GAUGES:
        yield GaugeMetricFamily(name, text, value=results[key])
    memory = state["redis"]
    yield GaugeMetricFamily(
        "fiscal_redis_evicting_policy",
        "1 while Redis' maxmemory-policy may evict the worker's state (must be noeviction)",
        value=float(memory["evicting"]),
    )
    yield GaugeMetricFamily(
        "fiscal_redis_used_memory_bytes", "Redis used_memory", value=memory["used_memory"]
    )
    yield GaugeMetricFamily(
        "fiscal_redis_maxmemory_bytes", "Redis maxmemory (0: none)", value=memory["maxmemory"]
    )
    yield GaugeMetricFamily(
        "fiscal_workers_alive", "Worker processes with a live heartbeat", value=state["workers"]
    )
    if state["newest_heartbeat_age"] is not None:
        yield GaugeMetricFamily(
            "fiscal_worker_heartbeat_age_seconds",
            "Seconds since the newest worker heartbeat",
            value=state["newest_heartbeat_age"],
        )
    dead_letters = state["dead_letters"]
    dead = GaugeMetricFamily("fiscal_dead_letters", "Dead-letter entries", labels=["reason"])
    by_reason = dead_letters.get("by_reason", {})
    for reason in REASONS:  # every reason, zeros too: rates and alerts need the series
        dead.add_metric([reason], by_reason.get(reason, 0))
    yield dead
    yield GaugeMetricFamily(
        "fiscal_dead_letters_bytes",
        "Size of the dead-letter entries (JSON bytes)",
        value=dead_letters.get("bytes", 0),
    )
    yield GaugeMetricFamily(
        "fiscal_dead_letters_over_bound",
        "1 while the dead-letter store is at or past its warning bound",
        value=float(bool(dead_letters.get("over_bound", False))),
    )
    per_brand = {
        "circuit_open": GaugeMetricFamily(
            "fiscal_brand_circuit_open",
            "1 while the circuit is open (or half-open, its probe to come)",
            labels=["brand"],
        ),
        "backlog": GaugeMetricFamily(
            "fiscal_brand_backlog_seconds", "Budget reserved ahead", labels=["brand"]
        ),
        "paused": GaugeMetricFamily("fiscal_brand_paused", "1 after a 429", labels=["brand"]),
        "others": GaugeMetricFamily(
            "fiscal_brand_others_estimate", "Budget used by others", labels=["brand"]
        ),
        "calls": GaugeMetricFamily(
            "fiscal_brand_calls_in_window", "Our calls in the window", labels=["brand"]
        ),
    }
    for brand, info in state["brands"].items():
        budget, breaker = info["budget"], info["breaker"]
        per_brand["circuit_open"].add_metric([brand], float(_blocks_calls(breaker, settings)))
        per_brand["backlog"].add_metric([brand], budget["backlog_seconds"])
        per_brand["paused"].add_metric([brand], float(budget["paused_for_seconds"] is not None))
        per_brand["others"].add_metric([brand], budget["others_estimate"])
        per_brand["calls"].add_metric([brand], budget["calls_in_window"])
    yield from per_brand.values()


def _counters(counters: dict[str, float]) -> Iterator[Metric]:
    """The counters hash, field by field (worker/telemetry.py names them), as families."""
    ingested = CounterMetricFamily(
        "fiscal_results_ingested", "Results recorded from the ingest stream"
    )
    ingested.add_metric([], counters.get(telemetry.RECEIVED, 0))
    yield ingested
    fiscalised = CounterMetricFamily(
        "fiscal_results_fiscalised", "Results that ended fiscalised", labels=["how"]
    )
    for field, how in HOW_FISCALISED.items():
        fiscalised.add_metric([how], counters.get(field, 0))
    yield fiscalised
    dead = CounterMetricFamily(
        "fiscal_results_dead_lettered", "Results dead-lettered", labels=["reason"]
    )
    for reason in REASONS:
        dead.add_metric([reason], counters.get(telemetry.dead_lettered(reason), 0))
    yield dead
    retries = CounterMetricFamily(
        "fiscal_retries", "Results parked for a later try, by why", labels=["error_class"]
    )
    for error_class in telemetry.RetryClass:
        retries.add_metric([error_class.value], counters.get(telemetry.retry(error_class), 0))
    yield retries
    waits = CounterMetricFamily(
        "fiscal_rate_limit_wait_seconds", "Seconds waited for the rate budget", labels=["how"]
    )
    for how in telemetry.Wait:
        waits.add_metric([how.value], counters.get(telemetry.wait_ms(how), 0) / 1000)
    yield waits
    refreshes = CounterMetricFamily(
        "fiscal_token_refreshes", "Token refreshes (/v2/auth) by outcome", labels=["outcome"]
    )
    for outcome in telemetry.REFRESH_OUTCOMES:
        refreshes.add_metric([outcome], counters.get(telemetry.token_refresh(outcome), 0))
    yield refreshes
    changes = CounterMetricFamily(
        "fiscal_circuit_changes", "Circuit breaker transitions", labels=["change"]
    )
    for change in telemetry.CIRCUIT_CHANGES:
        changes.add_metric([change], counters.get(telemetry.circuit(change), 0))
    yield changes
    calls = CounterMetricFamily(
        "fiscal_api_calls",
        "Clopos API answers by endpoint and status",
        labels=["endpoint", "status"],
    )
    answers = {(endpoint, "429"): 0.0 for endpoint in telemetry.ENDPOINT_NAMES}
    for field, count in counters.items():  # a 429 series from zero: its first one counts
        kind, _, rest = field.partition(":")
        endpoint, _, status = rest.partition(":")
        if kind == "api" and endpoint and status:
            answers[endpoint, status] = count
    for (endpoint, status), count in sorted(answers.items()):
        calls.add_metric([endpoint, status], count)
    yield calls
    events = CounterMetricFamily("fiscal_events", "Other pipeline events", labels=["event"])
    for event in OTHER_EVENTS:
        events.add_metric([event], counters.get(event, 0))
    yield events


def _latency(fields: dict[str, float]) -> Iterator[Metric]:
    family = HistogramMetricFamily(
        "fiscal_e2e_latency_seconds",
        "From the stream entry (since=stream) or printed_at (since=printed) to the PATCH",
        labels=["since"],
    )
    bounds = [*map(str, map(float, telemetry.LATENCY_BUCKETS)), "+Inf"]
    for since in telemetry.Since:
        cumulative, buckets = 0.0, []
        for index, bound in enumerate(bounds):
            cumulative += fields.get(f"{since}:{index}", 0)
            buckets.append((bound, cumulative))
        family.add_metric([since.value], buckets, sum_value=fields.get(f"{since}:sum", 0))
    yield family
