"""The two guards that make many deliveries of one result have the effect of one.

receipt lock   SET NX with a TTL (LOCK_SECONDS): only its holder calls the API for the
               receipt, so two PATCHes of one receipt never run at once. Its token is a
               fence: right before every request the run checks that it still holds the
               lock and extends it, atomically with its result's lease
               (ResultStore.fence); a run whose lock lapsed takes it again and reads the
               receipt again before it writes, or steps aside.
fiscalised     the fiscal_id a receipt was fiscalised with, kept marker_ttl (30 days):
marker         a duplicate costs no API call while it lives; after it expires the GET
               check still prevents a second PATCH.
"""

from __future__ import annotations

import secrets

import redis

from worker import keys

LOCK_SECONDS = 120.0  # > a GET + auth + PATCH with their timeouts (~60 s worst case)
# (a setting: FISCAL_RECEIPT_LOCK_SECONDS)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class ReceiptLock:
    def __init__(
        self,
        redis_client: redis.Redis,
        brand: str,
        receipt_id: int,
        owner: str,
        seconds: float = LOCK_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.ttl_ms = int(seconds * 1000)
        self.key = keys.receipt_lock(brand, receipt_id)
        self.token = f"{owner}:{secrets.token_hex(6)}"
        self._release = redis_client.register_script(_RELEASE)
        self._extend = redis_client.register_script(_EXTEND)

    def acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def extend(self) -> bool:
        """Renew the full TTL if still ours; False means another worker may hold it now."""
        return bool(self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])


class FiscalisedMarkers:
    def __init__(self, redis_client: redis.Redis, *, ttl_seconds: int) -> None:
        self.redis = redis_client
        self.ttl_seconds = ttl_seconds

    def get(self, brand: str, receipt_id: int) -> str | None:
        value = self.redis.get(keys.fiscalised(brand, receipt_id))
        return None if value is None else str(value)

    def set(self, brand: str, receipt_id: int, fiscal_id: str, pipe: redis.client.Pipeline) -> None:
        pipe.set(keys.fiscalised(brand, receipt_id), fiscal_id, ex=self.ttl_seconds)
