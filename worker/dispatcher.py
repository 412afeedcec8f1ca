"""Moves due results from the schedule (keys.SCHEDULE) into the Celery queue.

Runs in every worker process (worker/service.py), so it scales with the pods and needs no
leader: `ResultStore.admit_due` decides atomically. A due result either goes to the queue
(its brand has a call slot within a second) or is parked until its reserved slot, so a
brand's backlog is spread over its budget in Redis and another brand's result, due now,
is published in the same pass. It publishes only while the Celery queue holds fewer than
`max_queued` messages: no queued message waits longer than its lease, and nothing waits
in worker memory.

Two sweeps keep the schedule and the records in step (neither should ever find anything;
each finding is logged at error level and counted):
  orphan        a schedule entry whose record is gone (deleted, or evicted by a Redis
                with an evicting maxmemory-policy): dead-lettered `retries_exhausted`
                with what is known (its id), never dropped silently
  unscheduled   a record with no schedule entry, which nothing would ever run: put back
                in the schedule, due now (`sweep_unscheduled`, a slow SCAN of the records)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import redis

from worker import keys, telemetry
from worker.audit_events import AuditEvents
from worker.dlq import DeadLetterStore, Reason
from worker.logs import describe, kv
from worker.store import Claimed, ResultStore

log = logging.getLogger(__name__)

BATCH = 100  # results claimed per round trip
SWEEP_SCAN_COUNT = 500  # records looked at per sweep step

Publish = Callable[[str, int, str, str], None]  # rid, dispatch, brand, receipt_id
# Publishes made inside it go to the broker together, when it ends (worker/app.py: kombu's
# publish batch, one round trip); it raises there if they could not be sent.
PublishBatch = Callable[[], AbstractContextManager[object]]


class PublishFailed(Exception):
    """Some admitted results could not be published (the broker refused or was away)."""


def publish_all(
    publish: Publish, batch: PublishBatch, items: Sequence[Claimed], what: str
) -> tuple[list[Claimed], Exception | None]:
    """Publish these admitted results' tasks in one batch: the ones that surely went, in
    order, and the first error if any did not. Nothing is raised: what was not published
    keeps its short publish lease and is re-driven from the schedule (a message that went
    after all is a stale dispatch then, a no-op)."""
    published: list[Claimed] = []
    failed: Exception | None = None
    try:
        with batch():
            for item in items:
                try:
                    publish(item.rid, item.dispatch, item.brand, item.receipt_id)
                    published.append(item)
                except Exception as exc:
                    failed = failed or exc
                    log.warning(kv(f"{what}_publish_failed", rid=item.rid, error=describe(exc)))
    except Exception as exc:  # the batch could not be sent: none of it surely went
        log.warning(kv(f"{what}_publish_failed", count=len(items), error=describe(exc)))
        return [], exc
    return published, failed


ORPHAN_ERROR = (
    "lost from Redis: the schedule held this result but its record is gone (deleted, or "
    "evicted: see maxmemory-policy); its stream entry was acknowledged, so the adapter's own "
    "log has the payload"
)


class Dispatcher:
    def __init__(
        self,
        store: ResultStore,
        publish: Publish,
        queue_length: Callable[[], int],
        *,
        max_queued: int,
        dlq: DeadLetterStore,
        batch: PublishBatch = contextlib.nullcontext,
        clock: Callable[[], float] = time.time,
        events: AuditEvents | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.batch = batch
        self.queue_length = queue_length
        self.max_queued = max_queued
        self.dlq = dlq
        self.clock = clock
        self._sweep_cursor = 0
        self.events = events or AuditEvents()

    def run_once(self) -> int:
        """One admission pass; returns how many due results it handled (published or
        parked until their slot) or found taken by another dispatcher since it read them,
        so the loop goes again at once while work is due."""
        queued = self.queue_length()
        if queued > self.max_queued // 2:
            # Topped up only below half: a pass fills half the queue's room at least, not
            # one message at a time as the workers take them (each pass costs round trips);
            # what waits meanwhile would wait behind the queued messages anyway.
            return 0
        room = self.max_queued - queued
        admission = self.store.admit_due(self.clock(), min(room, BATCH))
        published, failed = publish_all(self.publish, self.batch, admission.publish, "dispatch")
        # in the queue now: leased for as long as a message may wait there
        self.store.published(published, self.clock())
        if failed is not None:  # the loop pauses (worker/service.py) instead of spinning
            raise PublishFailed(describe(failed)) from failed
        for rid in admission.orphans:
            self.dead_letter_orphan(rid)
        if admission.handled:
            log.debug(kv("dispatched", published=len(admission.publish), parked=admission.parked))
        return admission.handled + admission.skipped

    def dead_letter_orphan(self, rid: str) -> str | None:
        """Dead-letter a schedule entry whose record is gone, and drop the entry, in one
        transaction; None if the record exists after all."""
        key = keys.result(rid)
        with self.store.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    return None
                pipe.multi()
                dlq_id = self.dlq.add(
                    reason=Reason.RETRIES_EXHAUSTED,
                    payload="",
                    error=ORPHAN_ERROR,
                    rid=rid,
                    pipeline=pipe,
                )
                pipe.zrem(keys.SCHEDULE, rid)
                pipe.hincrby(keys.COUNTERS, "orphans", 1)
                pipe.hincrby(keys.COUNTERS, telemetry.dead_lettered(Reason.RETRIES_EXHAUSTED), 1)
                pipe.execute()
            except redis.WatchError:
                return None
        log.error(kv("result_orphaned", rid=rid, dlq_id=dlq_id))
        self.events.finished(
            "dead_lettered",
            rid=rid,
            reason=Reason.RETRIES_EXHAUSTED,
            dlq_id=dlq_id,
            error=ORPHAN_ERROR,
        )
        return dlq_id

    def sweep_unscheduled(self) -> int:
        """One step of a SCAN over the records: any without a schedule entry is put back,
        due now. Returns how many it found; call it again to go on (it wraps around)."""
        self._sweep_cursor, found = self.store.redis.scan(
            self._sweep_cursor, match=keys.result("*"), count=SWEEP_SCAN_COUNT
        )
        prefix = len(keys.result(""))
        rids = [(k.decode() if isinstance(k, bytes) else k)[prefix:] for k in found]
        lost = self.store.reschedule_lost(rids, self.clock())
        for rid in lost:
            log.error(kv("result_unscheduled", rid=rid))
        if lost:
            self.store.redis.hincrby(keys.COUNTERS, "unscheduled", len(lost))
        return len(lost)
