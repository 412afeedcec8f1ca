"""The audit trail: the worker's record of one receipt, for `fiscal-worker receipt`, which is
also its fiscalised marker.

One hash per (brand, receipt_id) (`keys.receipt`; its fields are listed there): the state,
the result's fields and the last `max_attempts` API calls, kept `ttl_seconds` after the
last write (`fiscalised_ttl_seconds` once fiscalised, if longer). Short field names and
values keep it in Redis's compact encoding: a fiscalised receipt costs one key and about
200 bytes (docs/capacity.md). States: pending -> fiscalised | dead_lettered. A fiscalised
receipt is locked in Clopos for good, so its record stays fiscalised (with the fiscal_id it
got) whatever arrives later, unless `set_state(..., force=True)`; and while it lives, a
duplicate result is absorbed without an API call (worker/idempotency.py reads it).

Records of the layout before (three keys per receipt: keys.legacy_*) are read as well,
merged under the new one, until they expire or `fiscal-worker upgrade-keys` folds them in.

Every write takes an optional `pipeline` (after MULTI) to join the caller's transaction.
Longer retention is the audit events' (worker/audit_events.py), not Redis's.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from worker import keys, scripts
from worker.ingest_format import BRAND_PATTERN, parse_rfc3339, to_rfc3339

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

    from worker.settings import Settings

STATES = ("pending", "fiscalised", "dead_lettered")
CODES = {"pending": "p", "fiscalised": "f", "dead_lettered": "d"}
STATE_OF_CODE = {code: state for state, code in CODES.items()}
MAX_TEXT_CHARS = 256  # call / outcome / ids are cut here

# The record's fields (keys.receipt) by the name `get` gives them.
FIELDS = {
    "fiscal_id": "f",
    "device_id": "d",
    "result_id": "r",
    "venue_id": "v",
    "printed_at": "t",
    "extras": "x",
    "dlq_id": "q",
}

# Writes of the state go through worker/scripts/receipt_set_state.lua: a fiscalised record
# is never moved off fiscalised there, unless forced; attempts through receipt_attempt.lua.


class AuditTrail:
    """Per-receipt records, kept `ttl_seconds` after the last write (a fiscalised one at
    least `fiscalised_ttl_seconds`), `max_attempts` calls each."""

    def __init__(
        self,
        redis_client: Redis,
        *,
        ttl_seconds: int,
        max_attempts: int,
        fiscalised_ttl_seconds: int | None = None,
    ) -> None:
        if ttl_seconds < 1 or max_attempts < 1:
            raise ValueError("ttl_seconds and max_attempts must be >= 1")
        self.redis = redis_client
        self.ttl_seconds = int(ttl_seconds)
        self.fiscalised_ttl_seconds = max(self.ttl_seconds, int(fiscalised_ttl_seconds or 0))
        self.max_attempts = int(max_attempts)
        self._set_state_script = redis_client.register_script(scripts.load("receipt_set_state"))
        self._attempt_script = redis_client.register_script(scripts.load("receipt_attempt"))

    @classmethod
    def from_settings(cls, redis_client: Redis, settings: Settings) -> AuditTrail:
        return cls(
            redis_client,
            ttl_seconds=settings.audit_ttl_seconds,
            max_attempts=settings.audit_max_attempts,
            fiscalised_ttl_seconds=settings.fiscalised_marker_ttl_seconds,
        )

    def window(self) -> str:
        """How long a record is kept, for a person."""
        return f"{_duration(self.ttl_seconds)} after its last write, FISCAL_AUDIT_TTL_SECONDS"

    def record_received(
        self,
        brand: str,
        receipt_id: int,
        *,
        fiscal_id: str,
        device_id: str | None = None,
        result_id: str | None = None,
        venue_id: int | None = None,
        printed_at: str | None = None,
        extras: dict[str, Any] | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        """A result for this receipt arrived: state pending (a fiscalised record stays so)."""
        guarded = {
            "f": fiscal_id,
            "d": device_id,
            "r": result_id,
            "v": venue_id,
            "t": printed_at,
            "x": json.dumps(extras, separators=(",", ":")) if extras else None,
        }
        self._set_state(brand, receipt_id, "pending", guarded, {}, False, pipeline)

    def set_state(
        self,
        brand: str,
        receipt_id: int,
        state: str,
        *,
        fiscal_id: str | None = None,
        dlq_id: str | None = None,
        force: bool = False,
        pipeline: Pipeline | None = None,
    ) -> None:
        """Set the state. A fiscalised record keeps its state and fiscal_id unless `force`;
        `dlq_id` is recorded either way (a later result for it may be dead-lettered)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        guarded = {"f": fiscal_id}
        self._set_state(brand, receipt_id, state, guarded, {"q": dlq_id}, force, pipeline)

    def record_attempt(
        self,
        brand: str,
        receipt_id: int,
        *,
        call: str,
        http_status: int | None,
        outcome: str,
        at: datetime | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        """Append one API call's outcome; only the last `max_attempts` are kept."""
        key = _key(brand, receipt_id)
        millis = _millis(at)
        status = (
            str(http_status)
            if isinstance(http_status, int) and not isinstance(http_status, bool)
            else "-"
        )
        line = f"{millis} {_word(call)} {status} {_text(outcome)}"
        args = [line, self.max_attempts, self.ttl_seconds, self.fiscalised_ttl_seconds]
        if pipeline is None:
            self._attempt_script(keys=[key], args=args)
        else:
            scripts.queue(pipeline, self._attempt_script, keys=[key], args=args)

    def get(self, brand: str, receipt_id: int) -> dict[str, Any] | None:
        """The record, or None if there is none (never received, or expired). A legacy
        record is merged under the current one."""
        key = _key(brand, receipt_id)
        with self.redis.pipeline(transaction=False) as pipe:  # reads: no MULTI (Cluster-safe)
            pipe.hgetall(key)
            pipe.hgetall(keys.legacy_audit(brand, receipt_id))
            pipe.lrange(keys.legacy_audit_attempts(brand, receipt_id), 0, -1)
            pipe.get(keys.legacy_fiscalised(brand, receipt_id))
            pipe.pttl(key)
            fields, legacy, legacy_attempts, legacy_marker, pttl = pipe.execute()
        if not (fields or legacy or legacy_attempts or legacy_marker):
            return None
        record = _from_legacy(legacy, legacy_attempts, legacy_marker)
        if fields:
            state = STATE_OF_CODE.get(fields.get("s", ""))
            if state is not None:
                record["state"] = state
            for name, code in FIELDS.items():
                if code in fields:
                    record[name] = fields[code]
            if "u" in fields:
                record["updated_at"] = _time_text(fields["u"])
            record["attempts"] += _attempts(_ring(fields, self.max_attempts))
            if legacy_marker is not None and fields.get("s") != "f":
                # marked by the layout before, or an older worker: fiscalised is what it is
                record["state"], record["fiscal_id"] = "fiscalised", legacy_marker
        record["venue_id"] = _int(record.get("venue_id"))
        record["extras"] = _json_object(record.get("extras"))
        record["expires_in"] = int(pttl) // 1000 if fields and pttl and pttl > 0 else None
        return {"brand": brand, "receipt_id": receipt_id, **record}

    def fiscal_id_of(self, brand: str, receipt_id: int) -> str | None:
        """The fiscal id the receipt was fiscalised with, per its record (None if it is not
        fiscalised, or no record lives)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(_key(brand, receipt_id), "s", "f")
            pipe.get(keys.legacy_fiscalised(brand, receipt_id))
            (state, fiscal_id), legacy = pipe.execute()
        if state == "f":
            return fiscal_id
        return legacy if state is None else None

    def _set_state(
        self,
        brand: str,
        receipt_id: int,
        state: str,
        guarded: dict[str, Any],
        always: dict[str, Any],
        force: bool,
        pipeline: Pipeline | None,
    ) -> None:
        record_keys = [
            _key(brand, receipt_id),
            keys.legacy_audit(brand, receipt_id),
            keys.legacy_fiscalised(brand, receipt_id),
        ]
        always = {**always, "u": _millis(None)}
        guarded_args = _pairs(guarded)
        args = [
            self.ttl_seconds,
            self.fiscalised_ttl_seconds,
            CODES[state],
            1 if force else 0,
            len(guarded_args) // 2,
            *guarded_args,
            *_pairs(always),
        ]
        if pipeline is None:
            self._set_state_script(keys=record_keys, args=args)
        else:
            scripts.queue(pipeline, self._set_state_script, keys=record_keys, args=args)


def fold_legacy(redis_client: Redis, brand: str, receipt_id: int, *, max_attempts: int) -> bool:
    """Move one receipt's legacy keys (audit hash, attempts list, marker) into its record:
    the record's own fields and state win, the legacy attempts go before its own (the last
    `max_attempts` kept), its lifetime is the longest of theirs; the legacy keys are deleted
    in the same transaction. False if there was nothing to fold. For `upgrade-keys`, with
    the workers stopped (a concurrent write retries the fold, never is lost)."""
    key = _key(brand, receipt_id)
    legacy_keys = [
        keys.legacy_audit(brand, receipt_id),
        keys.legacy_audit_attempts(brand, receipt_id),
        keys.legacy_fiscalised(brand, receipt_id),
    ]
    while True:
        with redis_client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, *legacy_keys)
                if not pipe.exists(*legacy_keys):
                    return False
                fields = pipe.hgetall(key)
                legacy = _from_legacy(
                    pipe.hgetall(legacy_keys[0]),
                    pipe.lrange(legacy_keys[1], 0, -1),
                    pipe.get(legacy_keys[2]),
                )
                lifetimes = [pipe.pttl(k) for k in (key, *legacy_keys)]
                merged = _legacy_fields(legacy)
                own = {k: v for k, v in fields.items() if not _ring_field(k)}
                if legacy["state"] == "fiscalised" and own.get("s") != "f":
                    own["s"] = "f"  # fiscalised stays so, with the fiscal id it got
                    fiscal_id = merged.get("f") or own.get("f")
                    if fiscal_id:
                        own["f"] = fiscal_id
                merged.update(own)
                lines = [_legacy_line(a) for a in legacy["attempts"]]
                lines += _ring(fields, max_attempts)
                kept = lines[-max_attempts:]
                merged |= {f"a{i}": line for i, line in enumerate(kept)}
                if kept:
                    merged["n"] = str(len(kept))
                pipe.multi()
                if merged:
                    pipe.hset(key, mapping=merged)
                ttl = max(lifetimes)  # ms; -2 for a key not there
                if ttl > 0:
                    pipe.pexpire(key, ttl)
                pipe.delete(*legacy_keys)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def _legacy_fields(legacy: dict[str, Any]) -> dict[str, str]:
    """A legacy record's fields under the record's names (attempts apart)."""
    out: dict[str, str] = {}
    code = CODES.get(legacy.get("state") or "")
    if code:
        out["s"] = code
    for name, field in FIELDS.items():
        value = legacy.get(name)
        if value is not None:
            out[field] = value if isinstance(value, str) else json.dumps(value)
    updated = legacy.get("updated_at")
    if isinstance(updated, str):
        try:
            out["u"] = str(int(parse_rfc3339(updated).timestamp() * 1000))
        except ValueError:
            out["u"] = updated
    return out


def _legacy_line(attempt: dict[str, Any]) -> str:
    """A legacy JSON attempt as a record's attempt line."""
    try:
        millis: int | str = int(parse_rfc3339(str(attempt.get("at"))).timestamp() * 1000)
    except ValueError:
        millis = "0"
    status = attempt.get("http_status")
    shown = str(status) if isinstance(status, int) and not isinstance(status, bool) else "-"
    call, outcome = _word(attempt.get("call") or "-"), _text(attempt.get("outcome") or "")
    return f"{millis} {call} {shown} {outcome}"


def _key(brand: str, receipt_id: int) -> str:
    if not isinstance(brand, str) or not BRAND_PATTERN.fullmatch(brand):
        raise ValueError("brand must be 1-64 characters of A-Za-z0-9_.-")
    if not isinstance(receipt_id, int) or isinstance(receipt_id, bool) or receipt_id < 1:
        raise ValueError("receipt_id must be an integer >= 1")
    return keys.receipt(brand, receipt_id)


def _from_legacy(fields: dict[str, str], attempts: list[str], marker: str | None) -> dict[str, Any]:
    """A record of the layout before (hash, JSON attempts list, marker) as `get` gives it."""
    record: dict[str, Any] = {name: fields.get(name) for name in ("state", *FIELDS, "updated_at")}
    if marker is not None:  # the marker is what fiscalised means
        record["state"], record["fiscal_id"] = "fiscalised", marker
    record["attempts"] = []
    for raw in attempts:
        try:
            attempt = json.loads(raw)
        except ValueError:
            continue
        if isinstance(attempt, dict):
            record["attempts"].append(attempt)
    return record


def _ring(fields: dict[str, str], size: int) -> list[str]:
    """The attempt lines of a record, oldest first: `n` counts every attempt, the i-th is
    in field a<(i-1) % size> (receipt_attempt.lua); a damaged count gives none."""
    try:
        count = int(fields.get("n") or 0)
    except ValueError:
        return []
    first = max(0, count - size)
    lines = (fields.get(f"a{k % size}") for k in range(first, count))
    return [line for line in lines if line]


def _ring_field(name: str) -> bool:
    return name == "n" or (name[:1] == "a" and name[1:].isdecimal())


def _attempts(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        at, call, status = parts[:3]
        out.append(
            {
                "at": _time_text(at),
                "call": call,
                "http_status": int(status) if status.isdecimal() and len(status) < 6 else None,
                "outcome": parts[3] if len(parts) == 4 else "",
            }
        )
    return out


def _millis(at: datetime | None) -> int:
    if at is None:
        return int(time.time() * 1000)
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)  # naive: UTC


def _time_text(value: str) -> str | None:
    """An RFC 3339 time from unix ms (the record's), or the text as stored (a legacy or a
    damaged value)."""
    if value.isdecimal():
        try:
            return to_rfc3339(int(value) / 1000)
        except (OverflowError, OSError, ValueError):
            return value
    return value or None


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        days = seconds // 86400
        return f"{days} day{'s' if days != 1 else ''}"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds} s"


def _word(value: str) -> str:
    """One word (the call's name): no space or newline, cut at MAX_TEXT_CHARS."""
    return "_".join(str(value).split())[:MAX_TEXT_CHARS] or "-"


def _text(value: str) -> str:
    """One line, cut at MAX_TEXT_CHARS."""
    return " ".join(str(value).split())[:MAX_TEXT_CHARS]


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Flat field/value list for HSET, None values left out."""
    pairs: list[str] = []
    for name, value in fields.items():
        if value is not None:
            pairs += [name, value if isinstance(value, str) else str(value)]
    return pairs


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _json_object(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None
