"""The background loops every worker process runs beside Celery: ingest, dispatch, and a
heartbeat with the slow sweeps.

Started by a Celery bootstep (worker/app.py) in the main process of `celery worker`, so
every pod that runs tasks also reads the stream and drives the schedule. Each loop survives
any error (Redis restarting, a bug on one entry): it logs, waits a moment and goes on.

    ingest      read and settle stream entries; every RECLAIM_INTERVAL take over those of
                dead consumers; every PRUNE_INTERVAL drop dead pods' empty consumers
    dispatch    admission passes while work is due, else every DISPATCH_INTERVAL
    heartbeat   every `worker_heartbeat_seconds`: keep the results this worker holds
                (received, prefetched, running: Celery's reserved requests) leased for
                `worker_lease_seconds`, so those of a worker that died are re-driven that
                long after its last beat; register its brands (the exporter's list); write
                the health file, where every loop marks its progress (worker/health.py)
    sweep       a step of the unscheduled-records sweep every SWEEP_INTERVAL; every
                POLICY_CHECK_INTERVAL, Redis' maxmemory-policy again

`stop()` lets the current iteration finish; what it had not settled stays pending in the
stream or due in the schedule, for this or another worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from worker import keys, telemetry
from worker.dispatcher import Dispatcher, Publish, PublishBatch, PublishFailed
from worker.health import Pulse
from worker.ingest import IngestConsumer
from worker.logs import kv
from worker.redis_conn import is_evicting, maxmemory_policy, redis_client
from worker.runtime import Runtime

log = logging.getLogger(__name__)

DISPATCH_INTERVAL_SECONDS = 0.2
RECLAIM_INTERVAL_SECONDS = 5.0
PRUNE_INTERVAL_SECONDS = 600.0
CONSUMER_IDLE_SECONDS = 3600.0  # an empty consumer idle this long belonged to a dead pod
POLICY_CHECK_INTERVAL_SECONDS = 60.0
SWEEP_INTERVAL_SECONDS = 10.0  # one SCAN step of the records per interval
WORKER_FORGOTTEN_SECONDS = 3600.0  # a worker silent this long leaves the registry
ERROR_PAUSE_SECONDS = 1.0

Held = Callable[[], list[tuple[str, int]]]  # (rid, dispatch) of the results this worker holds


class WorkerService:
    def __init__(
        self,
        runtime: Runtime,
        publish: Publish,
        queue_name: str,
        held: Held | None = None,
        batch: PublishBatch = contextlib.nullcontext,
    ) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.stopping = threading.Event()
        self.queue_name = queue_name
        self.held = held or (lambda: [])
        self.pulse = Pulse(settings.health_file, beat_seconds=settings.worker_heartbeat_seconds)
        self.brands = sorted(runtime.fiscaliser.credentials)
        consumer = f"{socket.gethostname()}:{os.getpid()}"

        def queue_has_room() -> bool:
            return self.queue_length() < settings.max_queued

        self.consumer = IngestConsumer(
            redis_client=redis_client(settings, decode_responses=False),
            stream=settings.ingest_stream,
            consumer=consumer,
            store=runtime.store,
            dlq=runtime.dlq,
            audit=runtime.audit,
            events=runtime.events,
            publish=publish,
            queue_has_room=queue_has_room,
            batch=batch,
            claim_idle_seconds=settings.claim_idle_seconds,
        )
        self.dispatcher = Dispatcher(
            runtime.store,
            publish,
            self.queue_length,
            max_queued=settings.max_queued,
            dlq=runtime.dlq,
            batch=batch,
            events=runtime.events,
        )
        self.threads = [
            threading.Thread(target=self._ingest_loop, name="fiscal-ingest", daemon=True),
            threading.Thread(target=self._dispatch_loop, name="fiscal-dispatch", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="fiscal-heartbeat", daemon=True),
            threading.Thread(target=self._sweep_loop, name="fiscal-sweep", daemon=True),
        ]

    def queue_length(self) -> int:
        return int(self.runtime.redis.llen(self.queue_name))

    def start(self) -> None:
        self._guarded(self._write_health)  # the probes see a starting worker at once
        for thread in self.threads:
            thread.start()
        log.info(
            kv(
                "worker_service_started",
                stream=self.consumer.stream,
                consumer=self.consumer.consumer,
            )
        )

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.pulse.stop()  # the liveness probe lets the warm shutdown run
        for thread in self.threads:
            thread.join(timeout)
        log.info(kv("worker_service_stopped"))

    def _ingest_loop(self) -> None:
        next_reclaim = 0.0
        next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
        self._guarded(self.consumer.ensure_group)
        while not self.stopping.is_set():
            self.pulse.mark("ingest")
            if time.monotonic() >= next_reclaim:
                self._guarded(self.consumer.reclaim)
                next_reclaim = time.monotonic() + RECLAIM_INTERVAL_SECONDS
            if time.monotonic() >= next_prune:
                self._guarded(self._prune_consumers)
                next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
            self._guarded(self.consumer.poll)

    def _prune_consumers(self) -> int:
        return self.consumer.prune_consumers(CONSUMER_IDLE_SECONDS)

    def _heartbeat_loop(self) -> None:
        # Alone in its thread: nothing slow may delay the beat past the lease.
        while not self.stopping.is_set():
            self.pulse.mark("heartbeat")
            self._guarded(self.beat)
            self._guarded(self._write_health)
            self.stopping.wait(self.runtime.settings.worker_heartbeat_seconds)

    def _sweep_loop(self) -> None:
        next_policy_check = time.monotonic() + POLICY_CHECK_INTERVAL_SECONDS
        while not self.stopping.is_set():
            self.pulse.mark("sweep")
            self._guarded(self.dispatcher.sweep_unscheduled)
            if time.monotonic() >= next_policy_check:
                self._guarded(self._check_policy)
                next_policy_check = time.monotonic() + POLICY_CHECK_INTERVAL_SECONDS
            self.stopping.wait(SWEEP_INTERVAL_SECONDS)

    def beat(self) -> int:
        """Keep the results this worker holds leased for another worker_lease_seconds, and
        say it is alive (for `fiscal-worker stats`)."""
        settings = self.runtime.settings
        held = self.held()
        now = time.time()
        renewed = self.runtime.store.hold(held, now + settings.worker_lease_seconds)
        pipe = self.runtime.redis.pipeline(transaction=False)
        pipe.zadd(keys.WORKERS, {self.consumer.consumer: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - WORKER_FORGOTTEN_SECONDS)
        if self.brands:  # the exporter's brand list (no keyspace scan on a scrape)
            pipe.zadd(keys.BRANDS, dict.fromkeys(self.brands, now))
        pipe.zremrangebyscore(keys.BRANDS, "-inf", now - keys.BRAND_REGISTRY_SECONDS)
        telemetry.drain(pipe)  # the process's counts that no run's pipeline has taken
        pipe.execute()
        self.pulse.redis_answered()
        return renewed

    def _write_health(self) -> None:
        self.pulse.write()

    def _check_policy(self) -> None:
        policy = maxmemory_policy(self.runtime.redis)
        if is_evicting(policy):
            log.error(kv("redis_evicting_policy", maxmemory_policy=policy))

    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            self.pulse.mark("dispatch")
            published = self._guarded(self.dispatcher.run_once)
            if not published:
                self.stopping.wait(DISPATCH_INTERVAL_SECONDS)

    def _guarded(self, step: Callable[[], int | None]) -> int:
        try:
            return step() or 0
        except redis.RedisError as exc:
            log.warning(kv("redis_unavailable", step=step.__name__, error=exc.__class__.__name__))
        except PublishFailed as exc:  # logged per result by the dispatcher; pause, go on
            log.warning(kv("publish_paused", step=step.__name__, error=str(exc)))
        except Exception:
            log.exception(kv("loop_error", step=step.__name__))
        self.stopping.wait(ERROR_PAUSE_SECONDS)
        return 0
