"""The Celery app, `worker.app:app` (contract §1): Redis broker, JSON only, at-least-once.

    celery -A worker.app worker --loglevel INFO
    celery -A worker.app flower

Every setting below guards against one way Celery on Redis loses or doubles work
(../shared/celery-pitfalls.md); the comment says which.
"""

from __future__ import annotations

import logging
import ssl
import sys
from typing import Any

from celery import Celery, bootsteps
from celery.signals import after_setup_logger, celeryd_init

from worker import keys
from worker.logs import install_redaction, quiet_libraries
from worker.settings import SettingsError, get_settings

QUEUE = keys.CELERY_QUEUE

# Longer than any task can run (time limit below), so a running task's message is never
# handed to a second worker by the restore sweep. Recovery after a crash does not wait for
# it: the result's own lease in Redis (worker/store.py) re-drives it within ~2 minutes.
VISIBILITY_TIMEOUT_SECONDS = 3600
TASK_SOFT_TIME_LIMIT_SECONDS = 150
TASK_TIME_LIMIT_SECONDS = 180
MAX_TASKS_PER_CHILD = 200  # bounds a child to ~+30 MiB

try:
    _settings = get_settings()
except SettingsError as _exc:
    print(f"fiscal-worker: {_exc}", file=sys.stderr)
    raise SystemExit(1) from None


def broker_ssl(url: str) -> dict[str, Any] | None:
    """TLS for a rediss:// broker: verify the server's certificate unless the URL says
    otherwise (?ssl_cert_reqs=...), as redis-py does for the worker's own state."""
    if not url.startswith("rediss://") or "ssl_cert_reqs" in url:
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


app = Celery("fiscal-worker", include=["tasks.fiscalise"])
app.conf.update(
    broker_url=_settings.redis_url.get_secret_value(),
    broker_connection_retry_on_startup=True,
    broker_use_ssl=broker_ssl(_settings.redis_url.get_secret_value()),
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
    # JSON only, never pickle.
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    # Outcomes live in Redis (dead-letter store, audit trail); no result backend needed.
    task_ignore_result=True,
    task_default_queue=QUEUE,
    # At-least-once: ack after the task ran; a killed child's message goes back to the queue.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Pitfall 6: no hoarding; the queue length tells the autoscaler the truth.
    worker_prefetch_multiplier=1,
    # A pool process is replaced after this many tasks: measured (bench/backlog_memory.py),
    # a child's RSS grows ~0.15 MiB per task run, outside our pipeline (tracemalloc over
    # 2,000 runs of it: +1 KiB); recycling keeps the pool flat.
    worker_max_tasks_per_child=MAX_TASKS_PER_CHILD,
    # Flower sees every task.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_soft_time_limit=TASK_SOFT_TIME_LIMIT_SECONDS,
    task_time_limit=TASK_TIME_LIMIT_SECONDS,
    # On a lost broker connection running tasks finish; their results are safe in Redis and
    # a message that could not be acked comes back as a stale dispatch (a no-op).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=True,
)


class FiscalWorkerStep(bootsteps.StartStopStep):
    """Runs the ingest consumer and the dispatcher (worker/service.py) beside the pool."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.service: Any = None

    def start(self, parent: Any) -> None:
        from tasks.fiscalise import publish
        from worker.runtime import get_runtime
        from worker.service import WorkerService

        self.service = WorkerService(get_runtime(), publish, QUEUE)
        self.service.start()

    def stop(self, parent: Any) -> None:
        if self.service is not None:
            self.service.stop()


app.steps["worker"].add(FiscalWorkerStep)


@celeryd_init.connect
def _check_worker_settings(**_: Any) -> None:
    """A worker needs Clopos credentials: fail at start with one line, not a traceback."""
    try:
        _settings.clopos_credentials()
    except SettingsError as exc:
        print(f"fiscal-worker: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


@after_setup_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    install_redaction(logger)
    quiet_libraries()
