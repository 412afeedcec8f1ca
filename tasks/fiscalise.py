"""The fiscalise task: a thin shell that runs worker.pipeline for one result.

Arguments are ids only (result id, dispatch number) plus brand and receipt id for Flower;
the result itself is read from Redis, so a task never carries a secret or a stale copy.

Task states, as Flower shows them:
  SUCCESS  fiscalised, already done, absorbed duplicate, or a stale/finished delivery
  RETRY    parked in the schedule until its next try (no ETA message is held anywhere);
           Parked (Flower's exception field) says until when and why
  FAILURE  dead-lettered: DeadLettered names the reason and the dead-letter id
A Redis error mid-task is never a failed-and-acked task: the result's lease in Redis lapses
and the dispatcher publishes it again (celery-pitfalls #3); the task shows RETRY.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
from celery import Task
from celery.exceptions import Retry

from worker.app import TASK_NAME, app
from worker.ingest_format import to_rfc3339
from worker.logs import kv
from worker.pipeline import Kind
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


class DeadLettered(Exception):
    """The result was moved to the dead-letter store; the task ends as FAILURE.

    One string argument ("<reason> dlq_id=<id>: <detail>"), so Celery can serialise it."""


class Parked(Exception):
    """Why a parked result waits: the exception of its Retry, which the task-retried event
    carries, so Flower shows the reason ("parked until <time>: <detail>") and not "None"."""


@app.task(
    bind=True,
    name=TASK_NAME,
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(DeadLettered,),  # an expected outcome: logged in one line, no traceback
)
def fiscalise(
    self: Task, rid: str, dispatch: int, brand: str | None = None, receipt_id: int | None = None
) -> str:
    try:
        outcome = get_runtime().fiscaliser.run(rid, int(dispatch))
    except redis.RedisError as exc:
        log.warning(
            kv(
                "task_redis_error",
                rid=rid,
                brand=brand,
                receipt_id=receipt_id,
                error=exc.__class__.__name__,
            )
        )
        raise Retry(
            f"Redis unavailable ({exc.__class__.__name__}); the schedule re-drives it", exc
        ) from None
    if outcome.kind is Kind.DEAD_LETTERED:
        raise DeadLettered(f"{outcome.reason} dlq_id={outcome.dlq_id}: {outcome.detail}")
    if outcome.kind is Kind.PARKED and outcome.due is not None:
        when = datetime.fromtimestamp(outcome.due, UTC)
        why = f"parked until {to_rfc3339(outcome.due)}: {outcome.detail}"
        raise Retry(why, Parked(why), when=when)
    return f"{outcome.kind.value}: {outcome.detail}" if outcome.detail else outcome.kind.value
