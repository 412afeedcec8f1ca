"""The Celery app, `worker.app:app` (docs/interface.md): Redis broker, JSON only, at-least-once.

    celery -A worker.app worker --loglevel INFO
    celery -A worker.app flower

Every setting below guards against one way Celery on Redis loses or doubles work
(docs/celery-pitfalls.md); the comment says which.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.signals import after_setup_logger, celeryd_init, task_received

from worker import broker, keys
from worker.logs import install_redaction, kv, quiet_libraries
from worker.settings import SettingsError, get_settings

QUEUE = keys.CELERY_QUEUE  # the one queue, and the one task on it:
TASK_NAME = "fiscal.fiscalise"  # registered by tasks/fiscalise.py, sent by name (publish)
POLICY_CHECK_SECONDS = 20.0  # how long a starting worker waits for Redis to read its policy

# Longer than any task can run (time limit below), so a running task's message is never
# handed to a second worker by the restore sweep. Recovery after a crash does not wait for
# it: the result's own lease in Redis (worker/store.py) re-drives it within ~2 minutes.
VISIBILITY_TIMEOUT_SECONDS = 3600
TASK_SOFT_TIME_LIMIT_SECONDS = 150
TASK_TIME_LIMIT_SECONDS = 180
MAX_TASKS_PER_CHILD = 10_000  # a pool child is replaced after this many tasks,
# or once its resident memory passes this (~65 MiB idle; 4 of them + the main process fit
# the pod's 1 GiB limit, ops/k8s/base/worker.yaml)
MAX_MEMORY_PER_CHILD_KIB = 200 * 1024
CONSUMER_PULSE_SECONDS = 5.0  # Celery's event loop marks its progress (worker/health.py)

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


broker.install()  # kombu's Redis transport with one client per channel, not one per command
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
    # A pool process is replaced after MAX_TASKS_PER_CHILD tasks, or sooner if its memory
    # grows past MAX_MEMORY_PER_CHILD_KIB: a bound, not a routine (measured with redis-py 6.4:
    # a child's RSS stays flat, +0.7 MiB over 6,000 tasks; each replacement stalls the pool
    # for 0.2-4 s, which recycling every 200 tasks paid over and over).
    worker_max_tasks_per_child=MAX_TASKS_PER_CHILD,
    worker_max_memory_per_child=MAX_MEMORY_PER_CHILD_KIB,
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
        from worker.runtime import get_runtime
        from worker.service import WorkerService

        self.service = WorkerService(
            get_runtime(), publish, QUEUE, held=held_results, batch=publishing
        )
        parent.fiscal_service = self.service  # for ConsumerPulse
        self.service.start()

    def stop(self, parent: Any) -> None:
        if self.service is not None:
            self.service.stop()


class ConsumerPulse(bootsteps.StartStopStep):
    """Marks the progress of Celery's event loop (the consumer that takes tasks off the
    queue) for the liveness probe: a timer of that loop, so a hung loop stops marking."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, c: Any) -> None:
        service = getattr(c.controller, "fiscal_service", None)
        if service is None:
            return
        service.pulse.mark("consumer")
        self.timer = c.timer.call_repeatedly(
            CONSUMER_PULSE_SECONDS, service.pulse.mark, ("consumer",)
        )

    def stop(self, c: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    shutdown = stop


app.steps["worker"].add(FiscalWorkerStep)
app.steps["consumer"].add(ConsumerPulse)


_batch = threading.local()  # the producer of this thread's `publishing()` block


@contextlib.contextmanager
def publishing() -> Iterator[None]:
    """The block's `publish` calls go to the broker together when it ends, in one round
    trip (kombu's publish batch); raises there if they could not be sent."""
    with app.producer_or_acquire() as producer, producer.batch():
        _batch.producer = producer
        try:
            yield
        finally:
            _batch.producer = None


def publish(rid: str, dispatch: int, brand: str, receipt_id: str) -> None:
    """Put one result's task on the queue, by name (the worker package never imports the
    task module). Arguments are ids only; the task id is the result's rid, for Flower.
    Inside `publishing()` it is sent with the block's batch."""
    app.send_task(
        TASK_NAME,
        args=[rid, dispatch],
        kwargs={"brand": brand, "receipt_id": int(receipt_id) if receipt_id.isdigit() else None},
        task_id=rid,
        queue=QUEUE,
        ignore_result=True,  # as the app's task_ignore_result: outcomes live in Redis
        producer=getattr(_batch, "producer", None),
    )


def held_results() -> list[tuple[str, int]]:
    """(rid, dispatch) of every fiscalise request this worker process holds: received,
    prefetched or running (Celery's reserved requests, kept by its main process)."""
    from celery.worker import state

    for _ in range(3):
        try:
            requests = list(state.reserved_requests)
            break
        except RuntimeError:  # the set changed size while we copied it: again
            continue
    else:
        return []
    return [pair for pair in map(_held_pair, requests) if pair is not None]


def _held_pair(request: Any) -> tuple[str, int] | None:
    args = getattr(request, "args", None) or ()
    if getattr(request, "name", None) != TASK_NAME or len(args) < 2:
        return None
    try:
        return str(args[0]), int(args[1])
    except (TypeError, ValueError):
        return None


@task_received.connect
def _hold_received(request: Any = None, **_: Any) -> None:
    """A worker took a message: its result's lease is this worker's from now on (renewed by
    its heartbeat), so a worker that dies holding it frees it within worker_lease_seconds
    rather than the queue lease. Never raises: the consumer must go on."""
    pair = _held_pair(request)
    if pair is None:
        return
    try:
        from worker.runtime import get_runtime

        get_runtime().store.hold([pair], time.time() + _settings.worker_lease_seconds)
    except Exception as exc:  # Redis down: the queue lease still covers it
        logging.getLogger(__name__).warning(
            kv("hold_failed", rid=pair[0], error=exc.__class__.__name__)
        )


@celeryd_init.connect
def _check_worker_settings(**_: Any) -> None:
    """A worker needs Clopos credentials and a Redis that never evicts its state: fail at
    start with one line, not a traceback."""
    try:
        _settings.clopos_credentials()
    except SettingsError as exc:
        print(f"fiscal-worker: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    # A health file left by the container before this one (a pod's /tmp outlives its
    # restarts) must not pass this worker's probes: they wait for its own (worker/health.py).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_settings.health_file)
    _check_redis_policy()


def _check_redis_policy() -> None:
    from worker.redis_conn import EvictingRedis, check_policy, redis_client

    log = logging.getLogger(__name__)
    deadline = time.monotonic() + POLICY_CHECK_SECONDS
    while True:
        try:
            policy = check_policy(
                redis_client(_settings), allow_evicting=_settings.allow_evicting_redis
            )
            break
        except EvictingRedis as exc:
            print(f"fiscal-worker: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except redis.RedisError as exc:
            if time.monotonic() >= deadline:
                # Celery retries the broker itself; the heartbeat checks the policy later.
                log.warning(kv("redis_policy_unchecked", error=exc.__class__.__name__))
                return
            time.sleep(1.0)
    if policy is None:
        log.warning(kv("redis_policy_unknown", hint="make sure maxmemory-policy is noeviction"))
    elif policy != "noeviction":
        log.error(
            kv(
                "redis_evicting_policy",
                maxmemory_policy=policy,
                allowed="FISCAL_ALLOW_EVICTING_REDIS",
                risk="results, markers and leases can be deleted by Redis",
            )
        )


@after_setup_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    install_redaction(logger)
    quiet_libraries()
