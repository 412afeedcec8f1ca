"""The dead-letter store: results the worker gave up on, kept in Redis (docs/interface.md).

Each entry is one JSON string under `keys.dlq_entry(id)`, indexed three ways (all, by
reason, by brand) in zsets scored in commit order (its sequence number, or one above
the last score when an entry with a later number committed first: dlq_add.lua), so the
newest page of a 100k store is one ZREVRANGE. `keys.DLQ_COUNTS` keeps the counts per
reason and brand for `stats()`, and `keys.DLQ_BYTES` the total size of the stored entry
JSON strings. Writes are atomic (Lua scripts, alone or in the caller's MULTI/EXEC): an
entry is never half in the store.

The store never discards on its own: entries leave only by `remove`, `purge` or `replay`.
`warn_entries` / `warn_bytes` are a warning, not a bound: at or past either one `stats()`
says `over_bound` and an add logs `dlq_over_bound` (at most once a minute per process).
Payloads are kept whole up to 1 MiB (else their first 64 KiB), so an entry's size is
predictable. A result id is dead-lettered at most once while its entry is in the store
(`keys.dlq_by_result`): a second add for it returns the first entry's id.

Entry fields: id, reason, receipt_id, brand, fiscal_id, attempts, first_seen, last_seen,
error, http_status, payload, payload_truncated, payload_bytes, payload_sha256,
payload_encoding, result, result_id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from worker import keys, scripts
from worker.ingest_format import BRAND_PATTERN, InvalidMessage, parse_entry, to_rfc3339
from worker.logs import kv

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

log = logging.getLogger(__name__)


class Reason(StrEnum):
    """Why a result was dead-lettered (docs/interface.md, Dead-letter store): a fixed set."""

    INVALID_MESSAGE = "invalid_message"  # not JSON, or breaks a field rule
    UNKNOWN_BRAND = "unknown_brand"  # no credentials for its brand
    FISCAL_ID_CONFLICT = "fiscal_id_conflict"  # the receipt carries another fiscal id
    RECEIPT_NOT_CLOSED = "receipt_not_closed"  # still open at the end of the not-ready window
    RECEIPT_NOT_FOUND = "receipt_not_found"  # still 404 at the end of the not-ready window
    VALIDATION_FAILED = "validation_failed"  # the API refused the request (400)
    AUTH_FAILED = "auth_failed"  # the brand's credentials were rejected, after bounded tries
    RETRIES_EXHAUSTED = "retries_exhausted"  # transient failures outlasted their window


REASONS = tuple(reason.value for reason in Reason)
MAX_PAYLOAD_BYTES = 1024 * 1024  # kept whole up to here (docs/interface.md)
TRUNCATED_PAYLOAD_BYTES = 64 * 1024  # what is kept of a larger payload
MAX_ERROR_CHARS = 2_000  # an error message is cut here
MAX_FIELD_CHARS = 256  # brand / fiscal_id of an invalid message are cut here
PAGE = 500  # ids read per round trip when walking an index
WARN_ENTRIES = 100_000  # past this many entries the store warns (it never drops one)
WARN_BYTES = 1024**3  # or past this much entry JSON
OVER_BOUND_WARNING_SECONDS = 60.0  # `dlq_over_bound` is logged at most this often

ID_PATTERN = re.compile(r"dl-[1-9][0-9]*")
HEAD_BYTES = 16 * 1024  # an entry's fields before its payload fit in this (see `heads`)
HEAD_CHUNK = 200  # entries read per round trip by a filtered page or a bulk selection
SCAN_LIMIT = 5_000  # a filtered page reads at most this many entries, then says `partial`
_PAYLOAD_MARKER = ',"payload":'
_NOT_IN_HEAD = frozenset(
    ("payload", "payload_truncated", "payload_bytes", "payload_sha256", "payload_encoding",
     "result", "result_id")
)  # fmt: skip

# Scripts (worker/scripts/dlq_*.lua): dlq_add (an entry with its index memberships, counts
# and size, unless its result id has one already), dlq_remove and dlq_replay (XADD its
# payload and remove it, in one step). Their KEYS are `_removal()`'s.

# When this process last logged `dlq_over_bound` (time.monotonic()).
_last_over_bound_warning = float("-inf")
_over_bound_lock = threading.Lock()


class Selection:
    """Which entries a console page or bulk action means: a reason, a brand ('' = messages
    whose brand was unreadable), a receipt id, and a time range on `last_seen` (since
    inclusive, until exclusive). The first two walk an index; the others are checked per
    entry."""

    __slots__ = ("brand", "reason", "receipt_id", "since", "until")

    def __init__(
        self,
        *,
        reason: str | None = None,
        brand: str | None = None,
        receipt_id: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> None:
        if reason is not None and reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        self.reason, self.brand, self.receipt_id = reason, brand, receipt_id
        self.since, self.until = since, until

    @property
    def post_filtered(self) -> bool:
        return self.receipt_id is not None or self.since is not None or self.until is not None

    def accepts(self, head: dict[str, Any]) -> bool:
        if self.receipt_id is not None and head.get("receipt_id") != self.receipt_id:
            return False
        if self.since is None and self.until is None:
            return True
        seen = _parse_time(head.get("last_seen"))
        if seen is None:
            return False
        return (self.since is None or seen >= self.since) and (
            self.until is None or seen < self.until
        )


class Page(NamedTuple):
    """A page of `DeadLetterStore.page`: its entries (heads), the seq to go on below (None:
    no more), whether it stopped at the scan limit, and how many entries it read."""

    entries: list[dict[str, Any]]
    next_before: int | None
    partial: bool
    scanned: int


class Replayed(NamedTuple):
    """`replay_many`'s outcome: [{"id", "stream_id"}] and [{"id", "error"}]."""

    replayed: list[dict[str, str]]
    refused: list[dict[str, str]]


class ReplayError(Exception):
    """An entry cannot be replayed (truncated or unusable payload); str() is one line."""


class DeadLetterStore:
    """Dead-lettered results in Redis; never trimmed, warns at or past its bound.

    `warn_entries` (default 100_000) and `warn_bytes` (default 1 GiB, of entry JSON)
    only decide `stats()["over_bound"]` and the `dlq_over_bound` warning.
    """

    def __init__(
        self,
        redis_client: Redis,
        *,
        warn_entries: int = WARN_ENTRIES,
        warn_bytes: int = WARN_BYTES,
    ) -> None:
        if warn_entries < 1:
            raise ValueError("warn_entries must be >= 1")
        if warn_bytes < 1:
            raise ValueError("warn_bytes must be >= 1")
        self.redis = redis_client
        self.warn_entries = warn_entries
        self.warn_bytes = warn_bytes
        self._add_script = redis_client.register_script(scripts.load("dlq_add"))
        self._remove_script = redis_client.register_script(scripts.load("dlq_remove"))
        self._replay_script = redis_client.register_script(scripts.load("dlq_replay"))
        self._head_script = redis_client.register_script(scripts.load("dlq_head"))
        # Per caller's pipeline: by-result key -> (entry id, its queued command), so a
        # second add for one result id in one MULTI returns the first one's id.
        self._queued: weakref.WeakKeyDictionary[Pipeline, dict[str, tuple[str, Any]]] = (
            weakref.WeakKeyDictionary()
        )

    # --- writing -----------------------------------------------------------------------

    def add(
        self,
        *,
        reason: str,
        payload: str | bytes,
        error: str,
        receipt_id: int | None = None,
        brand: str | None = None,
        fiscal_id: str | None = None,
        attempts: int = 0,
        first_seen: datetime | str | float | None = None,
        last_seen: datetime | str | float | None = None,
        http_status: int | None = None,
        result: dict[str, Any] | BaseModel | None = None,
        rid: str | None = None,
        pipeline: Pipeline | None = None,
    ) -> str:
        """Dead-letter one result; returns its id `dl-<n>`.

        `payload` is the stream entry's `data` field exactly as the adapter wrote it.
        `result` is the parsed result (dict or FiscalResult), null for invalid messages;
        receipt_id / brand / fiscal_id default to its fields.

        A result is dead-lettered once: while an entry for its `rid` (the stream entry id) is
        in the store, add() writes nothing and returns that entry's id (checked and written in
        one Lua script, so concurrent adds for one result make one entry). The entry keeps the
        rid in its field `result_id` (a name of the JSON output, which the CLI prints).

        With `pipeline` (a transaction after MULTI) the id is allocated now and the guarded
        write is queued on it, to commit with the caller's own changes (if another process
        dead-letters the same result id first, the write does nothing at EXEC); otherwise it
        runs here. Nothing is ever dropped: past the bound an add only logs a warning.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}; one of {', '.join(REASONS)}")
        result_fields = _result_dict(result)
        if result_fields is not None:
            receipt_id = result_fields.get("receipt_id") if receipt_id is None else receipt_id
            brand = result_fields.get("brand") if brand is None else brand
            fiscal_id = result_fields.get("fiscal_id") if fiscal_id is None else fiscal_id
        entry_rid = None if rid is None else str(rid)
        by_result = None if entry_rid is None else keys.dlq_by_result(entry_rid)
        if pipeline is not None and by_result is not None:
            existing = self._queued_on(pipeline, by_result) or self._existing(by_result)
            if existing is not None:
                _log_duplicate(existing, entry_rid)
                return existing
        now = to_rfc3339()
        entry_brand = _cut(brand)
        seq = int(self.redis.incr(keys.DLQ_SEQ))
        entry_id = f"dl-{seq}"
        entry: dict[str, Any] = {
            "id": entry_id,
            "reason": reason,
            "receipt_id": _int_or_none(receipt_id),
            "brand": entry_brand,
            "fiscal_id": _cut(fiscal_id),
            "attempts": max(0, _int_or_none(attempts) or 0),
            "first_seen": now if first_seen is None else to_rfc3339(first_seen),
            "last_seen": now if last_seen is None else to_rfc3339(last_seen),
            "error": str(error)[:MAX_ERROR_CHARS],
            "http_status": _int_or_none(http_status),
            **_payload_fields(payload),
            "result": result_fields,
            "result_id": entry_rid,
        }
        text = _dumps(entry)
        script_keys, args = _addition(entry_id, entry, seq, text)
        if pipeline is not None:
            outcome = self._add_script(keys=script_keys, args=args, client=pipeline)
            if outcome is pipeline:  # queued (a pipeline that is WATCHing runs it now)
                if by_result is not None:
                    command = pipeline.command_stack[-1] if pipeline.command_stack else None
                    self._queued.setdefault(pipeline, {})[by_result] = (entry_id, command)
                self._warn_if_over_bound(pending_bytes=len(text.encode("utf-8")))
                return entry_id
        else:
            outcome = self._add_script(keys=script_keys, args=args)
        stored_id = _text(outcome[0])
        if int(outcome[1]) != 1:
            _log_duplicate(stored_id, entry_rid)
            return stored_id
        if pipeline is None:
            log.info(
                kv(
                    "dlq_added",
                    id=entry_id,
                    reason=reason,
                    brand=_brand_key(entry_brand) or None,
                    receipt_id=entry["receipt_id"],
                    rid=_log_safe(entry_rid),
                )
            )
        self._warn_if_over_bound(entries=int(outcome[2]), size=int(outcome[3]))
        return stored_id

    def _existing(self, by_result: str) -> str | None:
        """The id of the entry stored for a result id (its by-result key), if any."""
        entry_id = self.redis.get(by_result)
        if entry_id is None or self.redis.zscore(keys.DLQ_INDEX, _text(entry_id)) is None:
            return None
        return _text(entry_id)

    def _queued_on(self, pipeline: Pipeline, by_result: str) -> str | None:
        """The id an earlier add() queued on this pipeline for a result id, if still queued."""
        entry_id, command = self._queued.get(pipeline, {}).get(by_result, (None, None))
        stack = getattr(pipeline, "command_stack", ())
        if entry_id is None or command is None or not any(c is command for c in stack):
            return None
        return entry_id

    def _warn_if_over_bound(
        self, *, entries: int | None = None, size: int | None = None, pending_bytes: int = 0
    ) -> None:
        """Log `dlq_over_bound` (at most once per OVER_BOUND_WARNING_SECONDS per process)
        when the store is at or past a bound; without counts, read them (+1 entry queued)."""
        global _last_over_bound_warning
        if time.monotonic() - _last_over_bound_warning < OVER_BOUND_WARNING_SECONDS:
            return
        if entries is None or size is None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zcard(keys.DLQ_INDEX)
                pipe.get(keys.DLQ_BYTES)
                total, stored = pipe.execute()
            entries, size = int(total) + 1, _counter(stored) + pending_bytes
        if entries < self.warn_entries and size < self.warn_bytes:
            return
        with _over_bound_lock:
            now = time.monotonic()
            if now - _last_over_bound_warning < OVER_BOUND_WARNING_SECONDS:
                return
            _last_over_bound_warning = now
        log.warning(
            kv(
                "dlq_over_bound",
                entries=entries,
                bytes=size,
                warn_entries=self.warn_entries,
                warn_bytes=self.warn_bytes,
            )
        )

    @staticmethod
    def added(replies: list[Any], entry_id: str) -> bool:
        """Whether a transaction's replies (the caller's `pipeline` of `add`) hold dlq_add's
        "added" answer for `entry_id`: False when the entry was another add's (its result
        was dead-lettered first by someone else) or was never queued."""
        for reply in replies:
            if not (isinstance(reply, list) and len(reply) >= 2):
                continue
            first, second = reply[0], reply[1]
            text = first.decode() if isinstance(first, bytes) else first
            if text == entry_id and second in (1, b"1", "1"):
                return True
        return False

    def remove(self, entry_id: str) -> dict[str, Any] | None:
        """Remove one entry atomically; returns it, or None if there was none."""
        removed = self._remove_many([entry_id]) if ID_PATTERN.fullmatch(entry_id) else []
        return removed[0] if removed else None

    def purge(self, *, reason: str | None = None, brand: str | None = None) -> int:
        """Remove every entry (of a reason and/or brand) present now; returns the count."""
        purged = 0
        for batch in _batched(self.ids(reason=reason, brand=brand), PAGE):
            purged += len(self._remove_many(batch))
        return purged

    def _remove_many(self, entry_ids: list[str]) -> list[dict[str, Any]]:
        raws = self.redis.mget([keys.dlq_entry(entry_id) for entry_id in entry_ids])
        entries = [_loads(raw) for raw in raws]
        with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, entry in zip(entry_ids, entries, strict=True):
                script_keys, args = _removal(entry_id, entry)
                self._remove_script(keys=script_keys, args=args, client=pipe)
            outcomes = pipe.execute()
        return [
            entry
            for entry, existed in zip(entries, outcomes, strict=True)
            if entry is not None and existed == 1
        ]

    def replay(self, entry_id: str, *, stream: str) -> str | None:
        """Put an entry's payload back on the ingest stream and remove it, in one step.

        Returns the new stream entry id, or None if there is no such entry. The stream
        entry is `data <payload> replay_of <id>`. Raises ReplayError when the payload
        cannot go through the normal path again (truncated, not UTF-8, still invalid).
        """
        entry = self.get(entry_id)
        if entry is None:
            return None
        if entry.get("payload_truncated"):
            raise ReplayError(
                f"{entry_id}: payload was truncated ({entry.get('payload_bytes')} bytes); "
                "cannot replay"
            )
        if entry.get("payload_encoding", "utf-8") != "utf-8":
            raise ReplayError(f"{entry_id}: payload was not valid UTF-8; cannot replay")
        try:
            parse_entry(entry["payload"])
        except InvalidMessage as exc:
            raise ReplayError(
                f"{entry_id}: payload is still invalid ({exc}); cannot replay"
            ) from None
        script_keys, args = _removal(entry_id, entry)
        stream_id = self._replay_script(keys=[stream, *script_keys], args=[*args, entry["payload"]])
        if stream_id is None:
            return None
        log.info(kv("dlq_replayed", id=entry_id, stream_id=_text(stream_id)))
        return _text(stream_id)

    # --- reading -----------------------------------------------------------------------

    def get(self, entry_id: str) -> dict[str, Any] | None:
        """One entry, or None."""
        if not ID_PATTERN.fullmatch(entry_id):
            return None
        return _loads(self.redis.get(keys.dlq_entry(entry_id)))

    def list(
        self,
        *,
        reason: str | None = None,
        brand: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Entries newest first, `offset` skipped, at most `limit`; brand '' = unknown."""
        if limit <= 0:
            return []
        offset = max(0, offset)
        walk = self._indexes(reason, brand)
        if walk is None:
            return []
        primary, other = walk
        if other is None:
            entry_ids = self.redis.zrevrange(primary, offset, offset + limit - 1)
        else:
            matching = self._scan(primary, other, newest_first=True)
            entry_ids = list(islice(matching, offset, offset + limit))
        return self._load_many(entry_ids)

    def count(self, reason: str | None = None, brand: str | None = None) -> int:
        """How many entries (of a reason and/or brand) there are."""
        walk = self._indexes(reason, brand)
        if walk is None:
            return 0
        primary, other = walk
        if other is None:
            return int(self.redis.zcard(primary))
        return sum(1 for _ in self._scan(primary, other, newest_first=True))

    def ids(self, *, reason: str | None = None, brand: str | None = None) -> Iterator[str]:
        """Ids oldest first, read in pages; entries added after the call are not included.

        Safe to remove entries while iterating (pages are keyed by score, not rank).
        """
        walk = self._indexes(reason, brand)
        if walk is None:
            return iter(())
        return self._scan(*walk, newest_first=False)

    def stats(self) -> dict[str, Any]:
        """{"total", "bytes", "by_reason": {reason: n}, "by_brand": {brand: n},
        "warn_entries", "warn_bytes", "over_bound"}; the counts omit zeros. `bytes` is the
        size of the stored entry JSON; over_bound: total >= warn_entries or bytes >= warn_bytes.
        """
        # not a transaction: a MULTI is refused as a whole by a Redis at maxmemory, and the
        # three reads need not agree to the entry
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.DLQ_INDEX)
            pipe.hgetall(keys.DLQ_COUNTS)
            pipe.get(keys.DLQ_BYTES)
            total, counts, stored = pipe.execute()
        by_reason: dict[str, int] = {}
        by_brand: dict[str, int] = {}
        for field, value in counts.items():
            kind, _, name = _text(field).partition(":")
            number = int(value)
            if number <= 0:
                continue
            if kind == "reason":
                by_reason[name] = number
            elif kind == "brand":
                by_brand[name] = number
        order = {reason: i for i, reason in enumerate(REASONS)}
        total, size = int(total), _counter(stored)
        return {
            "total": total,
            "bytes": size,
            "by_reason": dict(sorted(by_reason.items(), key=lambda kv: order.get(kv[0], 99))),
            "by_brand": dict(sorted(by_brand.items(), key=lambda kv: (-kv[1], kv[0]))),
            "warn_entries": self.warn_entries,
            "warn_bytes": self.warn_bytes,
            "over_bound": total >= self.warn_entries or size >= self.warn_bytes,
        }

    # --- the console's views: filtered pages, bulk selections, the trend ---------------

    def page(self, selection: Selection, *, before: int | None = None, limit: int = 50) -> Page:
        """One page of entries matching `selection`, newest first, below seq `before`.

        Entries are read without their payload (`heads`). The reason and brand filters walk
        an index; the receipt id and time range are checked on each entry's head, reading at
        most SCAN_LIMIT of them per page: a page that stops there is `partial`, and its
        `next_before` goes on from where it stopped.
        """
        walk = self._indexes(selection.reason, selection.brand)
        if walk is None or limit <= 0:
            return Page([], None, False, 0)
        primary, other = walk
        found: list[tuple[int, dict[str, Any]]] = []
        scanned = 0
        high = "+inf" if before is None else f"({before}"
        # one more than the page: a full page links to an older one only if there is one
        chunk = limit + 1 if other is None and not selection.post_filtered else HEAD_CHUNK
        while True:
            page = self.redis.zrevrangebyscore(
                primary, high, "-inf", start=0, num=chunk, withscores=True
            )
            ids = [(_text(member), int(score)) for member, score in page]
            scanned += len(ids)
            if other is not None:
                ids = self._also_in(other, ids)
            for (_, seq), head in zip(ids, self.heads([i for i, _ in ids]), strict=True):
                if head is not None and selection.accepts(head):
                    found.append((seq, head))
                    if len(found) > limit:
                        shown = found[:limit]
                        return Page([h for _, h in shown], shown[-1][0], False, scanned)
            if len(page) < chunk:  # the index has nothing older
                return Page([h for _, h in found], None, False, scanned)
            last = int(page[-1][1])
            if scanned >= SCAN_LIMIT:
                return Page([h for _, h in found], last, True, scanned)
            high = f"({last}"

    def selected_ids(self, selection: Selection, *, upto: int) -> Iterator[str]:
        """Ids matching `selection` with seq <= `upto`, oldest first, read in pages: what a
        bulk replay or purge confirmed at `upto` (entries added later are not touched)."""
        walk = self._indexes(selection.reason, selection.brand)
        if walk is None:
            return
        for batch in _batched(self._scan(*walk, newest_first=False, upper=upto), HEAD_CHUNK):
            if not selection.post_filtered:
                yield from batch
                continue
            for entry_id, head in zip(batch, self.heads(batch), strict=True):
                if head is not None and selection.accepts(head):
                    yield entry_id

    def count_selected(self, selection: Selection, *, upto: int) -> int:
        """How many entries `selected_ids` would yield (the count a confirmation names)."""
        if not selection.post_filtered and (selection.reason is None or selection.brand is None):
            walk = self._indexes(selection.reason, selection.brand)
            return 0 if walk is None else int(self.redis.zcount(walk[0], "-inf", upto))
        return sum(1 for _ in self.selected_ids(selection, upto=upto))

    def newest_seq(self) -> int:
        """The seq of the newest entry in the store (0: empty): a bulk action's `upto`."""
        top = self.redis.zrevrange(keys.DLQ_INDEX, 0, 0, withscores=True)
        return int(top[0][1]) if top else 0

    def replay_many(
        self, entry_ids: Iterable[str], *, stream: str, into: Replayed | None = None
    ) -> Replayed:
        """`replay` each entry; those that cannot go through again are refused and stay.

        The outcome is filled as it goes (`into`, if given), so a caller that sees Redis fail
        midway still knows, and logs, what was done."""
        outcome = Replayed([], []) if into is None else into
        for entry_id in entry_ids:
            try:
                stream_id = self.replay(entry_id, stream=stream)
            except ReplayError as exc:
                outcome.refused.append({"id": entry_id, "error": str(exc)})
                continue
            if stream_id is not None:  # None: removed meanwhile by someone else
                outcome.replayed.append({"id": entry_id, "stream_id": stream_id})
        return outcome

    def remove_many(self, entry_ids: Iterable[str], *, into: list[str] | None = None) -> list[str]:
        """Remove these entries (those still there); returns the ids removed, filled as it
        goes (`into`, if given: see `replay_many`)."""
        removed = [] if into is None else into
        valid = (entry_id for entry_id in entry_ids if ID_PATTERN.fullmatch(entry_id))
        for batch in _batched(valid, PAGE):
            removed += [str(entry.get("id")) for entry in self._remove_many(batch)]
        return removed

    def heads(self, entry_ids: list[str]) -> list[dict[str, Any] | None]:
        """Entries without their payload and result (None: not there), in one round trip.

        Reads only the first HEAD_BYTES of each: every field before `payload` is bounded
        (`add` cuts them), so a 1 MiB payload costs a list page nothing.
        """
        if not entry_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:  # one call per key: each touches one slot
                # as EVAL: a registered script in a pipeline costs a SCRIPT EXISTS first
                scripts.queue(
                    pipe, self._head_script,
                    keys=[keys.dlq_entry(entry_id)], args=[HEAD_BYTES, _PAYLOAD_MARKER],
                )  # fmt: skip
            raws = pipe.execute()
        heads = [_loads(raw + "}") if raw else None for raw in map(_as_text, raws)]
        missing = [i for i, raw in enumerate(raws) if raw is None]  # no marker: read it whole
        if missing:
            whole = self.redis.mget([keys.dlq_entry(entry_ids[i]) for i in missing])
            for index, raw in zip(missing, whole, strict=True):
                heads[index] = _without_payload(_loads(raw))
        return heads

    def trend(self, hours: int = 24, *, now: float | None = None) -> list[int]:
        """Entries added in each of the last `hours` hours, oldest first (this hour last)."""
        current = int((time.time() if now is None else now) // 3600)
        fields = [str(current - back) for back in range(hours - 1, -1, -1)]
        return [_counter(value) for value in self.redis.hmget(keys.DLQ_HOURLY, fields)]

    # --- helpers -----------------------------------------------------------------------

    def _also_in(self, other: str, ids: list[tuple[str, int]]) -> list[tuple[str, int]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in ids:
                pipe.zscore(other, entry_id)
            scores = pipe.execute()
        return [pair for pair, score in zip(ids, scores, strict=True) if score is not None]

    def _indexes(self, reason: str | None, brand: str | None) -> tuple[str, str | None] | None:
        """(zset to walk, zset to intersect with or None); None when nothing can match."""
        if reason is not None and reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        if brand is not None and brand != "" and not BRAND_PATTERN.fullmatch(brand):
            return None  # never indexed: a key is never built from such a string
        if reason is None and brand is None:
            return keys.DLQ_INDEX, None
        if brand is None:
            return keys.dlq_by_reason(str(reason)), None
        if reason is None:
            return keys.dlq_by_brand(brand), None
        by_reason, by_brand = keys.dlq_by_reason(reason), keys.dlq_by_brand(brand)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(by_reason)
            pipe.zcard(by_brand)
            reason_size, brand_size = pipe.execute()
        return (by_reason, by_brand) if reason_size <= brand_size else (by_brand, by_reason)

    def _scan(
        self, primary: str, other: str | None, *, newest_first: bool, upper: int | None = None
    ) -> Iterator[str]:
        """Ids of `primary` (also in `other`) by score, in pages, up to `upper` (default:
        today's newest)."""
        if upper is None:
            top = self.redis.zrevrange(primary, 0, 0, withscores=True)
            if not top:
                return
            upper = int(top[0][1])
        cursor: int | None = None
        while True:
            if newest_first:
                high = upper if cursor is None else f"({cursor}"
                page = self.redis.zrevrangebyscore(
                    primary, high, "-inf", start=0, num=PAGE, withscores=True
                )
            else:
                low = "-inf" if cursor is None else f"({cursor}"
                page = self.redis.zrangebyscore(
                    primary, low, upper, start=0, num=PAGE, withscores=True
                )
            if not page:
                return
            cursor = int(page[-1][1])
            entry_ids = [_text(member) for member, _ in page]
            if other is not None:
                with self.redis.pipeline(transaction=False) as pipe:
                    for entry_id in entry_ids:
                        pipe.zscore(other, entry_id)
                    scores = pipe.execute()
                entry_ids = [e for e, s in zip(entry_ids, scores, strict=True) if s is not None]
            yield from entry_ids

    def _load_many(self, entry_ids: Iterable[str]) -> list[dict[str, Any]]:
        entry_ids = [_text(entry_id) for entry_id in entry_ids]
        if not entry_ids:
            return []
        raws = self.redis.mget([keys.dlq_entry(entry_id) for entry_id in entry_ids])
        return [entry for entry in map(_loads, raws) if entry is not None]


# --- pure helpers ----------------------------------------------------------------------


def _as_text(raw: str | bytes | None) -> str | None:
    """A script's reply as text; None for false (Lua false comes back as None)."""
    if raw is None:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _without_payload(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {name: value for name, value in entry.items() if name not in _NOT_IN_HEAD}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _payload_fields(payload: str | bytes) -> dict[str, Any]:
    """The payload as kept: whole up to 1 MiB, else its first 64 KiB + size + SHA-256."""
    if isinstance(payload, str):
        try:
            raw = payload.encode("utf-8")
        except UnicodeEncodeError:
            # Read with surrogateescape (or surrogatepass): get the original bytes back.
            try:
                raw = payload.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = payload.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(payload)
    try:
        raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        encoding = "backslashreplace"
    truncated = len(raw) > MAX_PAYLOAD_BYTES
    kept = raw[:TRUNCATED_PAYLOAD_BYTES] if truncated else raw
    if encoding == "utf-8":
        # A cut may split the last character: drop its partial bytes.
        text = kept.decode("utf-8", "ignore") if truncated else kept.decode("utf-8")
    else:
        text = kept.decode("utf-8", "backslashreplace")
    return {
        "payload": text,
        "payload_truncated": truncated,
        "payload_bytes": len(raw),
        "payload_sha256": hashlib.sha256(raw).hexdigest() if truncated else None,
        "payload_encoding": encoding,
    }


def _removal(entry_id: str, entry: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of the add / removal scripts for one entry (None: only its index slot).

    KEYS: entry, index, by_reason, by_brand, counts, bytes, and by_result when the entry
    has a result id. ARGV: id, reason field, brand field.
    """
    reason = entry.get("reason") if entry else None
    reason = reason if reason in REASONS else REASONS[0]
    brand_key = _brand_key(entry.get("brand") if entry else None)
    rid = entry.get("result_id") if entry else None  # the field holds the rid
    script_keys = [
        keys.dlq_entry(entry_id),
        keys.DLQ_INDEX,
        keys.dlq_by_reason(reason),
        keys.dlq_by_brand(brand_key),
        keys.DLQ_COUNTS,
        keys.DLQ_BYTES,
    ]
    if isinstance(rid, str):
        script_keys.append(keys.dlq_by_result(rid))
    return script_keys, [entry_id, f"reason:{reason}", f"brand:{brand_key}"]


def _addition(
    entry_id: str, entry: dict[str, Any], seq: int, text: str
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of dlq_add for one entry: the removal's, the hourly count, the entry."""
    removal_keys, args = _removal(entry_id, entry)
    script_keys = [*removal_keys[:6], keys.DLQ_HOURLY, keys.DLQ_ORDER]
    script_keys += removal_keys[6:]  # by_result, when the entry has a result id
    hour = int(time.time() // 3600)
    return script_keys, [*args, str(seq), text, str(hour)]


def _brand_key(brand: Any) -> str:
    """The brand as used in keys: itself if valid, else '' (hostile input builds no key)."""
    return brand if isinstance(brand, str) and BRAND_PATTERN.fullmatch(brand) else ""


def _result_dict(result: dict[str, Any] | BaseModel | None) -> dict[str, Any] | None:
    if result is None:
        return None
    fields = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result)
    try:
        json.dumps(fields)
    except (TypeError, ValueError):
        fields = json.loads(json.dumps(fields, default=str))
    return fields


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cut(value: Any) -> str | None:
    return None if value is None else str(value)[:MAX_FIELD_CHARS]


def _log_duplicate(entry_id: str, rid: str | None) -> None:
    log.info(kv("dlq_duplicate", id=entry_id, rid=_log_safe(rid)))


def _counter(value: str | bytes | None) -> int:
    """A counter as read from Redis: missing, damaged or negative count as 0."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def _log_safe(value: str | None) -> str | None:
    """An untrusted id for a log line: its first 128 chars, unprintable ones as `?`."""
    return None if value is None else "".join(c if c.isprintable() else "?" for c in value[:128])


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(entry: dict[str, Any]) -> str:
    text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere in `result`: escape everything
        text = json.dumps(entry, separators=(",", ":"))
    return text


def _loads(raw: str | bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
