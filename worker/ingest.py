"""The ingest consumer: adapters' stream entries -> recorded results -> Celery tasks.

A consumer group on the ingest stream (docs/interface.md, Ingest). For each entry:
  valid    record the result (worker/store.py), publish its task, then XACK + XDEL
  invalid  dead-letter `invalid_message` with the raw payload, XACK + XDEL, in one transaction
Nothing is acknowledged before it is safe in Redis (recorded, or dead-lettered). Entries are
settled one by one as far as failures go: an entry whose write Redis refuses (an error reply,
e.g. `OOM command not allowed` at maxmemory under noeviction) stays pending while the others
of its batch are settled; if Redis cannot be reached at all the call raises and the rest stay
pending too. `reclaim()` (XAUTOCLAIM) hands entries idle longer than `claim_idle` to a live
consumer, which tries them again. Once a result is recorded, failing to publish its task (or
to write its audit record) is no reason to keep the entry: the result is due in the schedule
and the dispatcher publishes it, so the entry is acknowledged.

Poison: an entry is dead-lettered (`invalid_message`, raw payload kept) only when settling it
raised something other than a Redis error — a bug of ours on that input — and it has been
delivered more than MAX_DELIVERIES times, so it cannot loop forever. An entry that failed on
Redis errors stays pending however often it was delivered: an outage never turns a valid
result into a dead letter. Acknowledged entries are deleted (XDEL): the stream holds only what
is not settled yet.

One read brings about `read_bytes` (INGEST_READ_BYTES) of entries into the process at most: a
script reads entries one at a time (XREADGROUP ... >, or XAUTOCLAIM for `reclaim()`) while
their total size fits and returns only the id of the first one that does not (it is pending
for this consumer now); that one is then fetched alone (XRANGE id id), so an entry larger
than the bound is read by itself. When nothing is waiting, `poll()` blocks in XREADGROUP
COUNT 1 BLOCK block_ms. Entries over MAX_ENTRY_BYTES are not parsed: they are dead-lettered,
their payload truncated by the dead-letter store.

Consumers are named `host:pid`; `prune_consumers()` deletes the group's members that died
(idle for long, nothing pending).

The stream is read as bytes: an adapter may write anything, including invalid UTF-8.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker import keys, scripts, telemetry
from worker.audit import AuditTrail
from worker.audit_events import AuditEvents
from worker.dispatcher import Publish, PublishBatch, publish_all
from worker.dlq import DeadLetterStore, Reason
from worker.ingest_format import MAX_ENTRY_BYTES, FiscalResult, InvalidMessage, parse_entry
from worker.logs import describe, kv
from worker.store import ResultStore

log = logging.getLogger(__name__)

CLAIM_IDLE_SECONDS = 30.0  # an entry read this long ago and not settled: its consumer died
READ_BATCH = 100  # entries one read takes at most
INGEST_READ_BYTES = 8 * 1024 * 1024  # about what one read brings in (a larger entry: alone)
MAX_DELIVERIES = 5  # an entry our own code failed on, delivered more often, is dead-lettered

# Redis could not be reached (or did not answer): trying the next entry would only wait again.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)

# Scripts: worker/scripts/ingest_read.lua (entries one at a time while their total size
# fits in a byte budget; runs at maxmemory too) and ingest_prune.lua (dead consumers,
# checked and deleted in one step).


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: dict[bytes, bytes]

    @property
    def data(self) -> bytes | None:
        return self.fields.get(b"data")

    @property
    def size(self) -> int:
        """Bytes of its field names and values, as the read bound counts them."""
        return sum(len(name) + len(value) for name, value in self.fields.items())


@dataclass
class Settled:
    """What one `settle()` did with its entries."""

    accepted: int = 0  # valid: recorded (now or earlier) and acknowledged
    dead_lettered: int = 0  # invalid or poison: dead-lettered and acknowledged
    poisoned: int = 0  # of those, entries our own code failed on too often
    kept: int = 0  # left pending, to be tried again
    error: str | None = None  # the first error that kept one

    def keep(self, count: int, exc: BaseException) -> None:
        self.kept += count
        self.error = self.error or describe(exc)

    def __iadd__(self, other: Settled) -> Settled:
        self.accepted += other.accepted
        self.dead_lettered += other.dead_lettered
        self.poisoned += other.poisoned
        self.kept += other.kept
        self.error = self.error or other.error
        return self


class IngestConsumer:
    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        stream: str,
        consumer: str,
        store: ResultStore,
        dlq: DeadLetterStore,
        audit: AuditTrail,
        publish: Publish,
        queue_has_room: Callable[[], bool],
        batch: PublishBatch = contextlib.nullcontext,
        events: AuditEvents | None = None,
        claim_idle_seconds: float = CLAIM_IDLE_SECONDS,
        block_ms: int = 500,
        read_bytes: int = INGEST_READ_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client  # decode_responses=False
        self.stream = stream
        self.group = keys.INGEST_GROUP
        self.consumer = consumer
        self.store = store
        self.dlq = dlq
        self.audit = audit
        self.events = events or AuditEvents()
        self.publish = publish
        self.batch = batch
        self.queue_has_room = queue_has_room
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.block_ms = block_ms
        self.read_bytes = read_bytes
        self.clock = clock
        self._read_script = redis_client.register_script(scripts.load("ingest_read"))
        self._prune_script = redis_client.register_script(scripts.load("ingest_prune"))
        self._claim_cursor = "0-0"  # where the next reclaim() goes on scanning the PEL

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- reading ------------------------------------------------------------------------------
    def poll(self) -> int:
        """Read and settle new entries (blocking up to block_ms if none); returns how many."""
        try:
            entries, overflow = self._read_new()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream was deleted under us
            return 0
        read = len(entries)
        self.settle(entries)
        del entries  # one read's bytes at a time: let the batch go before the next entry
        if overflow is not None:
            read += self._settle_alone(overflow)[0]
        return read

    def reclaim(self) -> int:
        """Take over entries a consumer read and did not settle, idle longer than claim_idle,
        and settle them; returns how many."""
        try:
            entries, overflow, self._claim_cursor = self._read(
                "claim", READ_BATCH, self.read_bytes, self._claim_cursor
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._claim_cursor = "0-0"
            self.ensure_group()
            return 0
        if not entries and overflow is None:
            return 0
        read = len(entries)
        outcome = self.settle(entries)
        del entries
        if overflow is not None:
            more, alone = self._settle_alone(overflow)
            read += more
            outcome += alone
        log.info(
            kv(
                "ingest_reclaimed",
                count=read,
                settled=outcome.accepted + outcome.dead_lettered,
                poisoned=outcome.poisoned,
                kept=outcome.kept,
            )
        )
        return read

    def prune_consumers(self, idle_seconds: float = 3600) -> int:
        """Delete the group's consumers other than this one that have no pending entries and
        have been idle (no attempted read or claim) longer than `idle_seconds`: members of
        pods that died. One with pending entries stays until reclaim() has taken them over.
        Returns how many were deleted."""
        try:
            pruned = self._prune_script(
                keys=[self.stream], args=[self.group, self.consumer, int(idle_seconds * 1000)]
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc).lower():
                raise
            return 0  # no stream or no group yet: no consumers either
        names = [_name(name) for name in pruned or []]
        log.log(
            logging.INFO if names else logging.DEBUG,
            kv("ingest_consumers_pruned", count=len(names), consumers=",".join(names)[:500]),
        )
        return len(names)

    def _read_new(self) -> tuple[list[Entry], str | None]:
        entries, overflow, _ = self._read("new", READ_BATCH, self.read_bytes)
        if entries or overflow is not None:
            return entries, overflow
        # Nothing waiting: block until an entry arrives, then take what came with it.
        reply = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=1, block=self.block_ms
        )
        entries = [
            Entry(_text(eid), dict(fields)) for _, items in reply or [] for eid, fields in items
        ]
        room = self.read_bytes - sum(entry.size for entry in entries)
        if entries and room > 0:
            more, overflow, _ = self._read("new", READ_BATCH - 1, room)
            entries.extend(more)
        return entries, overflow

    def _read(
        self, mode: str, count: int, budget: int, cursor: str = "0-0"
    ) -> tuple[list[Entry], str | None, str]:
        """(entries that fit in `budget` bytes, id of one more read but not fetched, cursor)."""
        reply = self._read_script(
            keys=[self.stream],
            args=[self.group, self.consumer, count, budget, mode, self.claim_idle_ms, cursor],
        )
        entries = [Entry(_text(reply[i]), _pairs(reply[i + 1])) for i in range(2, len(reply), 2)]
        return entries, _text(reply[1]) or None, _text(reply[0])

    def _settle_alone(self, entry_id: str) -> tuple[int, Settled]:
        """Fetch one entry read earlier (pending for this consumer) and settle it by itself."""
        rows = self.redis.xrange(self.stream, min=entry_id, max=entry_id, count=1)
        if not rows:
            return 0, Settled()  # deleted meanwhile; XAUTOCLAIM drops it from the PEL
        (eid, fields), *_ = rows
        return 1, self.settle([Entry(_text(eid), dict(fields))])

    # --- settling -----------------------------------------------------------------------------
    def settle(self, entries: list[Entry]) -> Settled:
        """Record the valid entries, publish those whose brand has a slot now, dead-letter the
        invalid ones; acknowledge each only after that. Each entry that can be settled is:
        one whose write Redis refuses stays pending and the others go on. Raises (leaving the
        rest pending) only when Redis cannot be reached."""
        outcome = Settled()
        accepted: list[tuple[Entry, FiscalResult]] = []
        for entry in entries:
            try:
                accepted.append((entry, self._parse(entry)))
            except InvalidMessage as exc:
                self._settle_invalid(entry, str(exc), outcome)
            except Exception as exc:
                self._failed(entry, exc, outcome)
        now = self.clock()
        recorded: list[Entry] = []
        created: list[str] = []
        for (entry, _), is_new in zip(accepted, self._record(accepted, now), strict=True):
            if isinstance(is_new, Exception):
                self._failed(entry, is_new, outcome)
                continue
            recorded.append(entry)
            if is_new:
                created.append(entry.entry_id)
        if created:
            self._admit(created, now)
        if recorded:
            self._ack_recorded(recorded, outcome)
        if outcome.kept:
            log.warning(
                kv("ingest_entries_kept", count=outcome.kept, of=len(entries), error=outcome.error)
            )
        return outcome

    def _admit(self, created: list[str], now: float) -> None:
        """Publish the just-recorded results whose brand has a slot now. Best effort: what is
        not published is due in the schedule, and the dispatcher takes it from there."""
        try:
            if not self.queue_has_room():
                return
            admission = self.store.admit(created, now)
        except Exception as exc:
            log.warning(kv("ingest_admit_failed", count=len(created), error=describe(exc)))
            return
        # what is not published keeps its publish lease; then the dispatcher publishes it
        published, _ = publish_all(self.publish, self.batch, admission.publish, "ingest")
        try:
            self.store.published(published, now)
        except Exception as exc:  # they keep the short publish lease: re-driven if not run
            log.warning(kv("ingest_published_failed", count=len(published), error=describe(exc)))

    def _ack_recorded(self, recorded: list[Entry], outcome: Settled) -> None:
        pipe = self.store.redis.pipeline(transaction=True)
        for entry in recorded:
            self._ack(entry.entry_id, pipe)
        pipe.hincrby(keys.COUNTERS, telemetry.RECEIVED, len(recorded))
        try:
            pipe.execute()
        except _UNREACHABLE:
            raise
        except redis.RedisError as exc:
            # At maxmemory Redis refuses a whole MULTI, though XACK and XDEL alone pass (and
            # XDEL frees memory): acknowledge these recorded results without the counter.
            if not self._ack_plain(recorded):
                outcome.keep(len(recorded), exc)
                log.debug(kv("ingest_ack_failed", count=len(recorded), error=describe(exc)))
                return
        outcome.accepted += len(recorded)

    def _ack_plain(self, recorded: list[Entry]) -> bool:
        pipe = self.store.redis.pipeline(transaction=False)
        for entry in recorded:
            # XDEL first: cut off between the two, a pending entry without content is
            # dropped from the PEL by XAUTOCLAIM, where an acked one would stay in the stream.
            pipe.xdel(self.stream, entry.entry_id)
            pipe.xack(self.stream, self.group, entry.entry_id)
        try:
            pipe.execute()
        except _UNREACHABLE:
            raise
        except redis.RedisError:
            return False
        return True

    def _failed(self, entry: Entry, exc: Exception, outcome: Settled) -> None:
        """Settling `entry` raised: keep it pending, or dead-letter it as poison."""
        if isinstance(exc, _UNREACHABLE):
            raise exc
        if isinstance(exc, redis.RedisError):  # Redis refused: try again later, however often
            outcome.keep(1, exc)
            log.debug(kv("ingest_entry_kept", rid=entry.entry_id, error=describe(exc)))
            return
        try:
            deliveries = self._deliveries(entry.entry_id)
        except _UNREACHABLE:
            raise
        except redis.RedisError:
            deliveries = 0
        if deliveries <= MAX_DELIVERIES:
            outcome.keep(1, exc)
            log.warning(
                kv(
                    "ingest_entry_failed",
                    rid=entry.entry_id,
                    deliveries=deliveries,
                    error=describe(exc),
                ),
                exc_info=exc,
            )
            return
        error = f"entry could not be settled after {deliveries} deliveries: {describe(exc)}"
        if self._settle_invalid(entry, error, outcome, event="result_poisoned"):
            outcome.poisoned += 1

    def _settle_invalid(
        self, entry: Entry, error: str, outcome: Settled, event: str = "result_invalid"
    ) -> bool:
        try:
            self._dead_letter(entry, error, event)
        except _UNREACHABLE:
            raise
        except redis.RedisError as exc:
            outcome.keep(1, exc)
            log.debug(kv("ingest_entry_kept", rid=entry.entry_id, error=describe(exc)))
            return False
        except Exception as exc:
            outcome.keep(1, exc)
            log.exception(kv("ingest_dead_letter_failed", rid=entry.entry_id))
            return False
        outcome.dead_lettered += 1
        return True

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

    def _record(
        self, accepted: list[tuple[Entry, FiscalResult]], now: float
    ) -> list[bool | Exception]:
        """Store the results, due now, in one round trip; then the audit records of the new
        ones in another. Per entry: True (recorded), False (recorded before: re-claimed) or
        the error that kept it from being recorded; raises only if Redis is unreachable."""
        if not accepted:
            return []
        pipe = self.store.redis.pipeline(transaction=False)
        queued: list[bool | Exception] = []
        for entry, result in accepted:
            try:
                self.store.create(
                    entry.entry_id,
                    result.model_dump(mode="json", exclude_none=True),
                    (entry.data or b"").decode("utf-8"),
                    score=now,
                    now=now,
                    pipeline=pipe,
                )
                queued.append(True)
            except Exception as exc:  # a bug of ours on this input: not queued
                queued.append(exc)
        replies = iter(pipe.execute(raise_on_error=False) if pipe.command_stack else [])
        outcomes: list[bool | Exception] = []
        for ok in queued:
            if isinstance(ok, Exception):
                outcomes.append(ok)
                continue
            reply = next(replies)
            if isinstance(reply, _UNREACHABLE):
                raise reply
            outcomes.append(reply if isinstance(reply, Exception) else bool(reply))
        self._audit_received(accepted, outcomes)
        for (entry, result), is_new in zip(accepted, outcomes, strict=True):
            if isinstance(is_new, bool):
                log.info(
                    kv(
                        "result_received",
                        rid=entry.entry_id,
                        brand=result.brand,
                        receipt_id=result.receipt_id,
                        result_id=result.result_id,
                        device_id=result.device_id,
                        duplicate_entry=not is_new,
                    )
                )
        return outcomes

    def _audit_received(
        self, accepted: list[tuple[Entry, FiscalResult]], outcomes: list[bool | Exception]
    ) -> None:
        """The audit records of the results just created, in one round trip. Best effort: a
        recorded result does not wait for its audit record (keeping the entry would not help)."""
        pipe = self.store.redis.pipeline(transaction=False)
        queued = 0
        for (entry, result), is_new in zip(accepted, outcomes, strict=True):
            if is_new is not True:
                continue
            try:
                self.audit.record_received(
                    result.brand,
                    result.receipt_id,
                    fiscal_id=result.fiscal_id,
                    device_id=result.device_id,
                    result_id=result.result_id or entry.entry_id,
                    venue_id=result.venue_id,
                    printed_at=result.printed_at,
                    extras=result.extras() or None,
                    pipeline=pipe,
                )
            except Exception as exc:  # this entry's record only; the others' go on
                log.warning(kv("audit_record_failed", rid=entry.entry_id, error=describe(exc)))
                continue
            queued += 1
        if not queued:
            return
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:
            log.warning(kv("audit_record_failed", count=queued, error=describe(exc)))
            return
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:
            log.warning(kv("audit_record_failed", count=len(failed), error=describe(failed[0])))

    def _dead_letter(self, entry: Entry, error: str, event: str = "result_invalid") -> None:
        payload = entry.data if entry.data is not None else _describe_fields(entry.fields)
        pipe = self.store.redis.pipeline(transaction=True)
        dlq_id = self.dlq.add(
            reason=Reason.INVALID_MESSAGE,
            payload=payload,
            error=error,
            rid=entry.entry_id,
            pipeline=pipe,
        )
        pipe.hincrby(keys.COUNTERS, telemetry.dead_lettered(Reason.INVALID_MESSAGE), 1)
        self._ack(entry.entry_id, pipe)  # dead-lettered and acknowledged together, or neither
        replies = pipe.execute()
        log.warning(kv(event, rid=entry.entry_id, dlq_id=dlq_id, error=error[:200]))
        if not self.dlq.added(replies, dlq_id):  # another consumer's add: its event
            return
        self.events.finished(
            "dead_lettered",
            rid=entry.entry_id,
            reason=Reason.INVALID_MESSAGE,
            dlq_id=dlq_id,
            error=error,
        )

    def _ack(self, entry_id: str, pipe: redis.client.Pipeline) -> None:
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)

    def _deliveries(self, entry_id: str) -> int:
        rows = self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _name(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _describe_fields(fields: dict[bytes, bytes]) -> bytes:
    """A payload for an entry without `data`: its field names and values, as the adapter sent."""
    parts = [name + b"=" + value for name, value in fields.items()]
    return b"\n".join(parts)[: 2 * 1024 * 1024]
