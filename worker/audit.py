"""The audit trail: the worker's record of one receipt, for `fiscal-worker receipt`.

Per (brand, receipt_id): a hash (`keys.audit`) with the state and the result's fields, and
a capped list of attempts (`keys.audit_attempts`), both expiring `ttl_seconds` after the
last write. States: pending -> fiscalised | dead_lettered. A fiscalised receipt is locked
in Clopos for good, so its record stays fiscalised (with the fiscal_id it got) whatever
arrives later, unless `set_state(..., force=True)`.

Every write takes an optional `pipeline` (after MULTI) to join the caller's transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker import keys, scripts
from worker.ingest_format import BRAND_PATTERN, to_rfc3339

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

STATES = ("pending", "fiscalised", "dead_lettered")
MAX_TEXT_CHARS = 256  # call / outcome / ids are cut here

# Writes of the state go through worker/scripts/audit_set_state.lua: a fiscalised record
# is never moved off fiscalised there, unless forced.


class AuditTrail:
    """Per-receipt records, kept `ttl_seconds` after the last write, `max_attempts` each."""

    def __init__(self, redis_client: Redis, *, ttl_seconds: int, max_attempts: int) -> None:
        if ttl_seconds < 1 or max_attempts < 1:
            raise ValueError("ttl_seconds and max_attempts must be >= 1")
        self.redis = redis_client
        self.ttl_seconds = int(ttl_seconds)
        self.max_attempts = int(max_attempts)
        self._set_state_script = redis_client.register_script(scripts.load("audit_set_state"))

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
            "fiscal_id": fiscal_id,
            "device_id": device_id,
            "result_id": result_id,
            "venue_id": venue_id,
            "printed_at": printed_at,
            "extras": json.dumps(extras) if extras else None,
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
        guarded = {"fiscal_id": fiscal_id}
        self._set_state(brand, receipt_id, state, guarded, {"dlq_id": dlq_id}, force, pipeline)

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
        audit_key, attempts_key = _keys(brand, receipt_id)
        attempt = {
            "at": to_rfc3339(at),
            "call": str(call)[:MAX_TEXT_CHARS],
            "http_status": http_status
            if isinstance(http_status, int) and not isinstance(http_status, bool)
            else None,
            "outcome": str(outcome)[:MAX_TEXT_CHARS],
        }
        pipe = pipeline if pipeline is not None else self.redis.pipeline(transaction=True)
        pipe.rpush(attempts_key, json.dumps(attempt))
        pipe.ltrim(attempts_key, -self.max_attempts, -1)
        pipe.expire(attempts_key, self.ttl_seconds)
        pipe.expire(audit_key, self.ttl_seconds)
        if pipeline is None:
            with pipe:
                pipe.execute()

    def get(self, brand: str, receipt_id: int) -> dict[str, Any] | None:
        """The record, or None if there is none (never received, or expired)."""
        audit_key, attempts_key = _keys(brand, receipt_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(audit_key)
            pipe.lrange(attempts_key, 0, -1)
            fields, raw_attempts = pipe.execute()
        if not fields and not raw_attempts:
            return None
        attempts = []
        for raw in raw_attempts:
            try:
                attempts.append(json.loads(raw))
            except ValueError:
                continue
        return {
            "brand": brand,
            "receipt_id": receipt_id,
            "state": fields.get("state"),
            "fiscal_id": fields.get("fiscal_id"),
            "device_id": fields.get("device_id"),
            "result_id": fields.get("result_id"),
            "venue_id": _int(fields.get("venue_id")),
            "printed_at": fields.get("printed_at"),
            "extras": _json_object(fields.get("extras")),
            "updated_at": fields.get("updated_at"),
            "dlq_id": fields.get("dlq_id"),
            "attempts": attempts,
        }

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
        audit_key, attempts_key = _keys(brand, receipt_id)
        always = {**always, "brand": brand, "receipt_id": receipt_id, "updated_at": to_rfc3339()}
        guarded_args = _pairs(guarded)
        args = [
            self.ttl_seconds,
            state,
            1 if force else 0,
            len(guarded_args) // 2,
            *guarded_args,
            *_pairs(always),
        ]
        if pipeline is None:
            self._set_state_script(keys=[audit_key, attempts_key], args=args)
        else:
            scripts.queue(
                pipeline, self._set_state_script, keys=[audit_key, attempts_key], args=args
            )


def _keys(brand: str, receipt_id: int) -> tuple[str, str]:
    if not isinstance(brand, str) or not BRAND_PATTERN.fullmatch(brand):
        raise ValueError("brand must be 1-64 characters of A-Za-z0-9_.-")
    if not isinstance(receipt_id, int) or isinstance(receipt_id, bool) or receipt_id < 1:
        raise ValueError("receipt_id must be an integer >= 1")
    return keys.audit(brand, receipt_id), keys.audit_attempts(brand, receipt_id)


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Flat field/value list for HSET, None values left out."""
    pairs: list[str] = []
    for name, value in fields.items():
        if value is not None:
            pairs += [name, value if isinstance(value, str) else str(value)]
    return pairs


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _json_object(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
