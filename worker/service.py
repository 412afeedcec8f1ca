"""The background loops every worker process runs beside Celery: ingest and dispatch.

Started by a Celery bootstep (worker/app.py) in the main process of `celery worker`, so
every pod that runs tasks also reads the stream and drives the schedule. Each loop survives
any error (Redis restarting, a bug on one entry): it logs, waits a moment and goes on.
`stop()` lets the current iteration finish; what it had not settled stays pending in the
stream or due in the schedule, for this or another worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from worker.dispatcher import Dispatcher, Publish
from worker.ingest import IngestConsumer
from worker.logs import kv
from worker.redis_conn import redis_client
from worker.runtime import Runtime

log = logging.getLogger(__name__)

DISPATCH_INTERVAL_SECONDS = 0.2
RECLAIM_INTERVAL_SECONDS = 5.0
ERROR_PAUSE_SECONDS = 1.0


class WorkerService:
    def __init__(self, runtime: Runtime, publish: Publish, queue_name: str) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.stopping = threading.Event()
        self.queue_name = queue_name
        consumer = f"{socket.gethostname()}:{os.getpid()}"

        def queue_has_room() -> bool:
            return self.queue_length() < settings.max_queued

        self.consumer = IngestConsumer(
            raw_redis=redis_client(settings, decode_responses=False),
            stream=settings.ingest_stream,
            consumer=consumer,
            store=runtime.store,
            dlq=runtime.dlq,
            audit=runtime.audit,
            publish=publish,
            queue_has_room=queue_has_room,
            claim_idle_seconds=settings.claim_idle_seconds,
        )
        self.dispatcher = Dispatcher(
            runtime.store, publish, self.queue_length, max_queued=settings.max_queued
        )
        self.threads = [
            threading.Thread(target=self._ingest_loop, name="fiscal-ingest", daemon=True),
            threading.Thread(target=self._dispatch_loop, name="fiscal-dispatch", daemon=True),
        ]

    def queue_length(self) -> int:
        return int(self.runtime.redis.llen(self.queue_name))

    def start(self) -> None:
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
        for thread in self.threads:
            thread.join(timeout)
        log.info(kv("worker_service_stopped"))

    def _ingest_loop(self) -> None:
        next_reclaim = 0.0
        self._guarded(self.consumer.ensure_group)
        while not self.stopping.is_set():
            if time.monotonic() >= next_reclaim:
                self._guarded(self.consumer.reclaim)
                next_reclaim = time.monotonic() + RECLAIM_INTERVAL_SECONDS
            self._guarded(self.consumer.poll)

    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            published = self._guarded(self.dispatcher.run_once)
            if not published:
                self.stopping.wait(DISPATCH_INTERVAL_SECONDS)

    def _guarded(self, step: Callable[[], int | None]) -> int:
        try:
            return step() or 0
        except redis.RedisError as exc:
            log.warning(kv("redis_unavailable", step=step.__name__, error=exc.__class__.__name__))
        except Exception:
            log.exception(kv("loop_error", step=step.__name__))
        self.stopping.wait(ERROR_PAUSE_SECONDS)
        return 0
