"""Prometheus metrics, read from Redis at scrape time (worker/status.py).

The state is shared by every worker process, so one exporter serves the whole deployment:
`fiscal-worker metrics --serve 9808` (or print once without --serve). Names:

    fiscal_results_unfinished / _due           results in the schedule / due now (KEDA)
    fiscal_celery_queue_length                 messages waiting in the Celery queue
    fiscal_ingest_stream_length / _pending     stream entries not settled / read, not settled
    fiscal_events_total{event}                 received, fiscalised, duplicate, patches, ...
    fiscal_dead_letters{reason}                entries in the dead-letter store
    fiscal_dead_letters_bytes                  size of its entries (JSON bytes)
    fiscal_dead_letters_over_bound             1 at or past FISCAL_DLQ_WARN_ENTRIES / _BYTES
    fiscal_brand_circuit_open{brand}           1 while the brand's circuit is open
    fiscal_brand_backlog_seconds{brand}        how far ahead its budget is reserved
    fiscal_brand_paused{brand}                 1 while paused after a 429
    fiscal_brand_others_estimate{brand}        budget used by other clients, estimated
    fiscal_brand_calls_in_window{brand}        our calls in the current window
    fiscal_redis_evicting_policy               1 under an evicting maxmemory-policy (alert)
    fiscal_redis_used_memory_bytes / _maxmemory_bytes   Redis memory and its limit
    fiscal_workers_alive                       worker processes with a live heartbeat
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.settings import Settings
from worker.status import collect


class RedisStateCollector(Collector):
    def __init__(self, redis_client: redis.Redis, settings: Settings) -> None:
        self.redis = redis_client
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        state = collect(self.redis, self.settings)
        results = state["results"]
        for name, key, text in [
            (
                "fiscal_results_unfinished",
                "unfinished",
                "Results not fiscalised or dead-lettered yet",
            ),
            ("fiscal_results_due", "due", "Results due now, waiting for a worker"),
            ("fiscal_celery_queue_length", "celery_queue", "Messages in the Celery queue"),
            ("fiscal_ingest_stream_length", "stream_length", "Ingest stream entries not settled"),
            ("fiscal_ingest_stream_pending", "stream_pending", "Entries read but not settled"),
        ]:
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
        events = CounterMetricFamily("fiscal_events", "Pipeline events", labels=["event"])
        for event, count in sorted(state["counters"].items()):
            events.add_metric([event], count)
        yield events
        dead_letters = state["dead_letters"]
        dead = GaugeMetricFamily("fiscal_dead_letters", "Dead-letter entries", labels=["reason"])
        for reason, count in sorted(dead_letters.get("by_reason", {}).items()):
            dead.add_metric([reason], count)
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
                "fiscal_brand_circuit_open", "1 while the circuit is open", labels=["brand"]
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
            per_brand["circuit_open"].add_metric([brand], float(breaker["state"] != "closed"))
            per_brand["backlog"].add_metric([brand], budget["backlog_seconds"])
            per_brand["paused"].add_metric([brand], float(budget["paused_for_seconds"] is not None))
            per_brand["others"].add_metric([brand], budget["others_estimate"])
            per_brand["calls"].add_metric([brand], budget["calls_in_window"])
        yield from per_brand.values()
