"""Moves due results from the schedule (keys.SCHEDULE) into the Celery queue.

Runs in every worker process (worker/service.py), so it scales with the pods and needs no
leader: `ResultStore.admit_due` decides atomically. A due result either goes to the queue
(its brand has a call slot within a second) or is parked until its reserved slot, so a
brand's backlog is spread over its budget in Redis and another brand's result, due now,
is published in the same pass. It publishes only while the Celery queue holds fewer than
`max_queued` messages: no queued message waits longer than its lease, and nothing waits
in worker memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.logs import kv
from worker.store import ResultStore

log = logging.getLogger(__name__)

BATCH = 100  # results claimed per round trip

Publish = Callable[[str, int, str, str], None]  # rid, dispatch, brand, receipt_id


class Dispatcher:
    def __init__(
        self,
        store: ResultStore,
        publish: Publish,
        queue_length: Callable[[], int],
        *,
        max_queued: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publish = publish
        self.queue_length = queue_length
        self.max_queued = max_queued
        self.clock = clock

    def run_once(self) -> int:
        """One admission pass; returns how many due results it handled (published or
        parked until their slot), so the loop goes again at once while work is due."""
        room = self.max_queued - self.queue_length()
        if room <= 0:
            return 0
        admission = self.store.admit_due(self.clock(), min(room, BATCH))
        for item in admission.publish:
            self.publish(item.rid, item.dispatch, item.brand, item.receipt_id)
        if admission.handled:
            log.debug(kv("dispatched", published=len(admission.publish), parked=admission.parked))
        return admission.handled
