"""The dead-letter store (contract §5): results the worker gave up on, kept in Redis.

Each entry is one JSON string under `keys.dlq_entry(id)`, indexed three ways (all, by
reason, by brand) in zsets scored by its sequence number, so the newest page of a 100k
store is one ZREVRANGE. `keys.DLQ_COUNTS` keeps the counts per reason and brand for
`stats()`. Writes are atomic (MULTI/EXEC or a Lua script): an entry is never half in the
store. The store is bounded by `max_entries`; the oldest entries are trimmed first.

Entry fields: id, reason, receipt_id, brand, fiscal_id, attempts, first_seen, last_seen,
error, http_status, payload, payload_truncated, payload_bytes, payload_sha256,
payload_encoding, result, result_id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from worker import keys
from worker.ingest_format import InvalidMessage, parse_entry, to_rfc3339
from worker.settings import BRAND_PATTERN

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

logger = logging.getLogger(__name__)

REASONS = (
    "invalid_message",
    "unknown_brand",
    "fiscal_id_conflict",
    "receipt_not_closed",
    "receipt_not_found",
    "validation_failed",
    "auth_failed",
    "retries_exhausted",
)
MAX_PAYLOAD_BYTES = 1024 * 1024  # kept whole up to here (contract §5)
TRUNCATED_PAYLOAD_BYTES = 64 * 1024  # what is kept of a larger payload
MAX_ERROR_CHARS = 2_000  # an error message is cut here
MAX_FIELD_CHARS = 256  # brand / fiscal_id of an invalid message are cut here
PAGE = 500  # ids read per round trip when walking an index

ID_PATTERN = re.compile(r"dl-[1-9][0-9]*")

# Removes one entry with its index memberships and counts; 1 if it existed.
# KEYS: entry, index, by_reason, by_brand, counts. ARGV: id, reason field, brand field.
_REMOVE_BODY = """
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if existed == 1 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  for i = 2, 3 do
    if redis.call('HINCRBY', KEYS[5], ARGV[i], -1) <= 0 then
      redis.call('HDEL', KEYS[5], ARGV[i])
    end
  end
end
"""
_REMOVE_LUA = _REMOVE_BODY + "return existed\n"
# Replay: XADD the payload to the stream and remove the entry, or nothing if it is gone.
# KEYS: as above + stream. ARGV: as above + payload.
_REPLAY_LUA = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return false end\n"
    "local stream_id = redis.call('XADD', KEYS[6], '*', 'data', ARGV[4], 'replay_of', ARGV[1])\n"
    + _REMOVE_BODY
    + "return stream_id\n"
)


class ReplayError(Exception):
    """An entry cannot be replayed (truncated or unusable payload); str() is one line."""


class DeadLetterStore:
    """Dead-lettered results in Redis, bounded by `max_entries` (default 100_000)."""

    def __init__(self, redis: Redis, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.redis = redis
        self.max_entries = max_entries
        self._remove_script = redis.register_script(_REMOVE_LUA)
        self._replay_script = redis.register_script(_REPLAY_LUA)

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
        result_id: str | None = None,
        pipeline: Pipeline | None = None,
    ) -> str:
        """Dead-letter one result; returns its id `dl-<n>`.

        `payload` is the stream entry's `data` field exactly as the adapter wrote it.
        `result` is the parsed result (dict or FiscalResult), null for invalid messages;
        receipt_id / brand / fiscal_id default to its fields.

        With `pipeline` (a transaction after MULTI) the id is allocated now and the writes
        are queued on it, to commit with the caller's own changes; otherwise they are
        executed here in one MULTI/EXEC. Either way the store is then kept within its bound.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}; one of {', '.join(REASONS)}")
        result_fields = _result_dict(result)
        if result_fields is not None:
            receipt_id = result_fields.get("receipt_id") if receipt_id is None else receipt_id
            brand = result_fields.get("brand") if brand is None else brand
            fiscal_id = result_fields.get("fiscal_id") if fiscal_id is None else fiscal_id
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
            "result_id": None if result_id is None else str(result_id),
        }
        brand_key = _brand_key(entry_brand)
        if pipeline is None:
            with self.redis.pipeline(transaction=True) as pipe:
                self._queue_add(pipe, seq, entry, brand_key)
                pipe.execute()
            logger.info(
                "dlq_added id=%s reason=%s brand=%s receipt_id=%s result_id=%s",
                entry_id,
                reason,
                brand_key or "-",
                entry["receipt_id"],
                _log_safe(entry["result_id"]),
            )
            self.trim()
        else:
            # Make room first: trimming after the caller's EXEC would be the caller's job.
            self.trim(max_entries=self.max_entries - 1)
            self._queue_add(pipeline, seq, entry, brand_key)
        return entry_id

    def _queue_add(self, pipe: Pipeline, seq: int, entry: dict[str, Any], brand_key: str) -> None:
        entry_id, reason = entry["id"], entry["reason"]
        pipe.set(keys.dlq_entry(entry_id), _dumps(entry))
        pipe.zadd(keys.DLQ_INDEX, {entry_id: seq})
        pipe.zadd(keys.dlq_by_reason(reason), {entry_id: seq})
        pipe.zadd(keys.dlq_by_brand(brand_key), {entry_id: seq})
        pipe.hincrby(keys.DLQ_COUNTS, f"reason:{reason}", 1)
        pipe.hincrby(keys.DLQ_COUNTS, f"brand:{brand_key}", 1)

    def trim(self, *, max_entries: int | None = None) -> int:
        """Remove the oldest entries beyond the bound; returns how many were removed."""
        bound = max(0, self.max_entries if max_entries is None else max_entries)
        removed = 0
        while True:
            excess = int(self.redis.zcard(keys.DLQ_INDEX)) - bound
            if excess <= 0:
                break
            oldest = self.redis.zrange(keys.DLQ_INDEX, 0, min(excess, PAGE) - 1)
            if not oldest:
                break
            removed += len(self._remove_many(oldest))
        if removed:
            self.redis.incrby(keys.DLQ_TRIMMED, removed)
            logger.warning("dlq_trimmed count=%d max_entries=%d", removed, self.max_entries)
        return removed

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
        stream_id = self._replay_script(keys=[*script_keys, stream], args=[*args, entry["payload"]])
        if stream_id is None:
            return None
        logger.info("dlq_replayed id=%s stream_id=%s", entry_id, _text(stream_id))
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
        """{"total", "by_reason": {reason: n}, "by_brand": {brand: n}, "trimmed"}; no zeros."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zcard(keys.DLQ_INDEX)
            pipe.hgetall(keys.DLQ_COUNTS)
            pipe.get(keys.DLQ_TRIMMED)
            total, counts, trimmed = pipe.execute()
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
        return {
            "total": int(total),
            "by_reason": dict(sorted(by_reason.items(), key=lambda kv: order.get(kv[0], 99))),
            "by_brand": dict(sorted(by_brand.items(), key=lambda kv: (-kv[1], kv[0]))),
            "trimmed": int(trimmed or 0),
        }

    # --- helpers -----------------------------------------------------------------------

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

    def _scan(self, primary: str, other: str | None, *, newest_first: bool) -> Iterator[str]:
        """Ids of `primary` (also in `other`) by score, in pages, up to today's newest."""
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
    """KEYS and ARGV of the removal script for one entry (None: only its index slot)."""
    reason = entry.get("reason") if entry else None
    reason = reason if reason in REASONS else REASONS[0]
    brand_key = _brand_key(entry.get("brand") if entry else None)
    script_keys = [
        keys.dlq_entry(entry_id),
        keys.DLQ_INDEX,
        keys.dlq_by_reason(reason),
        keys.dlq_by_brand(brand_key),
        keys.DLQ_COUNTS,
    ]
    return script_keys, [entry_id, f"reason:{reason}", f"brand:{brand_key}"]


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


def _log_safe(value: str | None) -> str:
    return "-" if value is None else "".join(c if c.isprintable() else "?" for c in value[:128])


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
