"""Moves due results from the schedule (keys.SCHEDULE) into the Celery queue.

Runs in every worker process (worker/service.py), so it scales with the pods and needs no
leader: `ResultStore.claim_due` leases what it takes atomically. It publishes only while
the Celery queue holds fewer than `max_queued` messages: a backlog waits in Redis, not in
the broker and not in worker memory, and no queued message waits longer than its lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.logs import kv
from worker.store import Claimed, ResultStore

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
        """Publish what is due, as far as the queue has room; returns how many."""
        room = self.max_queued - self.queue_length()
        if room <= 0:
            return 0
        claimed: list[Claimed] = self.store.claim_due(self.clock(), min(room, BATCH))
        for item in claimed:
            self.publish(item.rid, item.dispatch, item.brand, item.receipt_id)
        if claimed:
            log.debug(kv("dispatched", count=len(claimed)))
        return len(claimed)
