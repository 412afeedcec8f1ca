"""The two guards that make many deliveries of one result have the effect of one.

receipt lock   SET NX with a TTL (LOCK_SECONDS): only its holder calls the API for the
               receipt, so two PATCHes of one receipt never run at once. Its token is a
               fence: right before every request the run checks that it still holds the
               lock and extends it, atomically with its result's lease
               (worker/gate.py, gate_check); a run whose lock lapsed takes it again and reads the
               receipt again before it writes, or steps aside.
fiscalised     the receipt's record (keys.receipt, worker/audit.py) in state `f`, with
marker         the fiscal_id it was fiscalised with, kept the audit window at least: a
               duplicate costs no API call while it lives; after it expires the GET check
               still prevents a second PATCH. (A legacy marker, keys.legacy_fiscalised, is
               read too until it expires.)
"""

from __future__ import annotations

import secrets

import redis

from worker import keys, scripts

LOCK_SECONDS = 120.0  # > a GET + auth + PATCH with their timeouts (~60 s worst case)
# Clopos answers within its 8 s upstream limit (then 504): a PATCH we stopped waiting for has
# landed or failed at the server this long after it was sent at the latest.
IN_FLIGHT_SECONDS = 10.0
# (a setting: FISCAL_RECEIPT_LOCK_SECONDS)

# Scripts (worker/scripts/idempotency_*.lua): acquire (free, or held by an older dispatch
# of the same result), extend, release (each only if the lock is still ours), and
# hold_in_flight (a PATCH of ours may still be in flight: nobody may take the lock until it
# has landed or failed).


class ReceiptLock:
    def __init__(
        self,
        redis_client: redis.Redis,
        brand: str,
        receipt_id: int,
        rid: str,
        dispatch: int,
        seconds: float = LOCK_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.ttl_ms = int(seconds * 1000)
        self.key = keys.receipt_lock(brand, receipt_id)
        self.record_key = keys.receipt(brand, receipt_id)
        self.legacy_marker_key = keys.legacy_fiscalised(brand, receipt_id)
        self.rid, self.dispatch = rid, dispatch
        self.token = f"{rid}:{dispatch}:{secrets.token_hex(6)}"
        self._acquire = redis_client.register_script(scripts.load("idempotency_acquire"))
        self._release = redis_client.register_script(scripts.load("idempotency_release"))
        self._extend = redis_client.register_script(scripts.load("idempotency_extend"))
        self._hold_in_flight = redis_client.register_script(
            scripts.load("idempotency_hold_in_flight")
        )

    def take(self) -> tuple[bool, str | None]:
        """Take the lock if it is free or held by an older dispatch of this same result,
        unless the receipt is marked fiscalised: (taken, the marker's fiscal id or None),
        in one round trip."""
        taken, marked = self._acquire(
            keys=[self.key, self.record_key, self.legacy_marker_key],
            args=[self.token, self.ttl_ms, f"{self.rid}:", self.dispatch],
        )
        marked = marked.decode() if isinstance(marked, bytes) else str(marked)
        return bool(int(taken)), marked or None

    def acquire(self) -> bool:
        """`take`, for whether the lock was taken."""
        return self.take()[0]

    def extend(self) -> bool:
        """Renew the full TTL if still ours; False means another worker may hold it now."""
        return bool(self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    def hold_in_flight(self, seconds: float) -> bool:
        """After a PATCH whose answer we stopped waiting for: nobody, this result's re-run
        included, may call for the receipt for `seconds` (until that PATCH has surely landed
        or failed at the server); then the lock frees itself."""
        return bool(self._hold_in_flight(keys=[self.key], args=[self.token, int(seconds * 1000)]))

    def release(self, *, pipeline: redis.client.Pipeline | None = None) -> None:
        """Delete the lock if still ours; queued on `pipeline` when given (a run's finish)."""
        if pipeline is None:
            self._release(keys=[self.key], args=[self.token])
        else:
            scripts.queue(pipeline, self._release, keys=[self.key], args=[self.token])
