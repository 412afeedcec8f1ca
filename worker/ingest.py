"""The ingest consumer: adapters' stream entries -> recorded results -> Celery tasks.

A consumer group on the ingest stream (contract §3). For each entry:
  valid    record the result (worker/store.py), publish its task, then XACK + XDEL
  invalid  dead-letter `invalid_message` with the raw payload, XACK + XDEL, in one transaction
Nothing is acknowledged before it is safe in Redis, so a consumer that dies in between leaves
the entry pending; `reclaim()` (XAUTOCLAIM) hands entries idle longer than `claim_idle` to a
live consumer. An entry delivered MAX_DELIVERIES times without being settled is dead-lettered,
so one poisonous entry cannot loop forever. Acknowledged entries are deleted (XDEL): the
stream holds only what is not settled yet.

The stream is read as bytes: an adapter may write anything, including invalid UTF-8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker import keys
from worker.audit import AuditTrail
from worker.dispatcher import Publish
from worker.dlq import DeadLetterStore
from worker.ingest_format import MAX_ENTRY_BYTES, FiscalResult, InvalidMessage, parse_entry
from worker.logs import kv
from worker.store import ResultStore

log = logging.getLogger(__name__)

READ_BATCH = 100
MAX_DELIVERIES = 5  # an entry read this often and never settled is dead-lettered


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: dict[bytes, bytes]

    @property
    def data(self) -> bytes | None:
        return self.fields.get(b"data")


class IngestConsumer:
    def __init__(
        self,
        *,
        raw_redis: redis.Redis,
        stream: str,
        consumer: str,
        store: ResultStore,
        dlq: DeadLetterStore,
        audit: AuditTrail,
        publish: Publish,
        queue_has_room: Callable[[], bool],
        claim_idle_seconds: float = 30.0,
        block_ms: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = raw_redis  # decode_responses=False
        self.stream = stream
        self.group = keys.INGEST_GROUP
        self.consumer = consumer
        self.store = store
        self.dlq = dlq
        self.audit = audit
        self.publish = publish
        self.queue_has_room = queue_has_room
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.block_ms = block_ms
        self.clock = clock

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self) -> int:
        """Read and settle new entries (blocking up to block_ms); returns how many."""
        try:
            reply = self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=READ_BATCH, block=self.block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream was deleted under us
            return 0
        entries = [
            Entry(_text(eid), dict(fields)) for _, items in reply or [] for eid, fields in items
        ]
        self.settle(entries)
        return len(entries)

    def reclaim(self) -> int:
        """Take over entries another consumer read and never settled."""
        _, claimed, *_ = self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=READ_BATCH
        )
        entries = [Entry(_text(eid), dict(fields)) for eid, fields in claimed if fields]
        if not entries:
            return 0
        counts = self._delivery_counts([e.entry_id for e in entries])
        poisoned = [e for e in entries if counts.get(e.entry_id, 0) > MAX_DELIVERIES]
        for entry in poisoned:
            self._dead_letter(
                entry, f"entry could not be settled after {MAX_DELIVERIES} deliveries"
            )
        self.settle([e for e in entries if e not in poisoned])
        log.info(kv("ingest_reclaimed", count=len(entries), poisoned=len(poisoned)))
        return len(entries)

    def settle(self, entries: list[Entry]) -> None:
        """Record the valid entries, publish those whose brand has a slot now, dead-letter
        the invalid ones; acknowledge each only after that."""
        accepted: list[tuple[Entry, FiscalResult]] = []
        for entry in entries:
            try:
                accepted.append((entry, self._parse(entry)))
            except InvalidMessage as exc:
                self._dead_letter(entry, str(exc))
        if not accepted:
            return
        now = self.clock()
        created = [entry.entry_id for entry, result in accepted if self._record(entry, result, now)]
        if created and self.queue_has_room():
            admission = self.store.admit(created, now)
            for item in admission.publish:
                self.publish(item.rid, item.dispatch, item.brand, item.receipt_id)
        # Anything not published now is due in the schedule: the dispatcher takes it from there.
        pipe = self.store.redis.pipeline(transaction=True)
        for entry, _ in accepted:
            self._ack(entry.entry_id, pipe)
        pipe.hincrby(keys.COUNTERS, "received", len(accepted))
        pipe.execute()

    # --- one entry ----------------------------------------------------------------------------
    def _parse(self, entry: Entry) -> FiscalResult:
        data = entry.data
        if data is None:
            raise InvalidMessage("entry has no 'data' field")
        if len(data) > MAX_ENTRY_BYTES:
            raise InvalidMessage(
                f"entry is {len(data)} bytes, over the {MAX_ENTRY_BYTES}-byte limit; not parsed"
            )
        return parse_entry(data)

    def _record(self, entry: Entry, result: FiscalResult, now: float) -> bool:
        """Store the result, due now; False if this entry was recorded before (re-claimed)."""
        created = self.store.create(
            entry.entry_id,
            result.model_dump(mode="json", exclude_none=True),
            (entry.data or b"").decode("utf-8"),
            score=now,
            now=now,
        )
        if created:
            self.audit.record_received(
                result.brand,
                result.receipt_id,
                fiscal_id=result.fiscal_id,
                device_id=result.device_id,
                result_id=result.result_id or entry.entry_id,
                venue_id=result.venue_id,
                printed_at=result.printed_at,
                extras=result.extras() or None,
            )
        log.info(
            kv(
                "result_received",
                rid=entry.entry_id,
                brand=result.brand,
                receipt_id=result.receipt_id,
                result_id=result.result_id,
                device_id=result.device_id,
                duplicate_entry=not created,
            )
        )
        return created

    def _dead_letter(self, entry: Entry, error: str) -> None:
        payload = entry.data if entry.data is not None else _describe_fields(entry.fields)
        pipe = self.store.redis.pipeline(transaction=True)
        dlq_id = self.dlq.add(
            reason="invalid_message",
            payload=payload,
            error=error,
            result_id=entry.entry_id,
            pipeline=pipe,
        )
        pipe.hincrby(keys.COUNTERS, "dead_lettered:invalid_message", 1)
        self._ack(entry.entry_id, pipe)  # dead-lettered and acknowledged together, or neither
        pipe.execute()
        log.warning(kv("result_invalid", rid=entry.entry_id, dlq_id=dlq_id, error=error[:200]))

    def _ack(self, entry_id: str, pipe: redis.client.Pipeline) -> None:
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        rows = self.redis.xpending_range(
            self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2 + 10
        )
        return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe_fields(fields: dict[bytes, bytes]) -> bytes:
    """A payload for an entry without `data`: its field names and values, as the adapter sent."""
    parts = [name + b"=" + value for name, value in fields.items()]
    return b"\n".join(parts)[: 2 * 1024 * 1024]
