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
# Clopos answers within its 8 s upstream limit (then 504): a PATCH we stopped waiting for has
# landed or failed at the server this long after it was sent at the latest.
IN_FLIGHT_SECONDS = 10.0
# (a setting: FISCAL_RECEIPT_LOCK_SECONDS)

# KEYS: the lock. ARGV: token, ttl ms, "<rid>:", dispatch. Take a free lock; or one that an
# older dispatch of the same result holds: that run is dead or superseded (its fence fails),
# and a request it may still have in flight carries this same result's fiscal id.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[3]) == ARGV[3] then
  local older = tonumber(string.match(string.sub(held, #ARGV[3] + 1), '^(%d+):'))
  if older and older < tonumber(ARGV[4]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
end
return 0
"""
# KEYS: the lock. ARGV: token, ms. A PATCH of ours may still be in flight at the server:
# hold the receipt that long under a token nobody matches (not even a newer dispatch of
# this result), then it frees itself.
_HOLD_IN_FLIGHT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], 'in-flight:' .. ARGV[1], 'PX', ARGV[2]) and 1 or 0
end
return 0
"""
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
        rid: str,
        dispatch: int,
        seconds: float = LOCK_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.ttl_ms = int(seconds * 1000)
        self.key = keys.receipt_lock(brand, receipt_id)
        self.rid, self.dispatch = rid, dispatch
        self.token = f"{rid}:{dispatch}:{secrets.token_hex(6)}"
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._release = redis_client.register_script(_RELEASE)
        self._extend = redis_client.register_script(_EXTEND)
        self._hold_in_flight = redis_client.register_script(_HOLD_IN_FLIGHT)

    def acquire(self) -> bool:
        """Take the lock if it is free or held by an older dispatch of this same result."""
        return bool(
            self._acquire(
                keys=[self.key], args=[self.token, self.ttl_ms, f"{self.rid}:", self.dispatch]
            )
        )

    def extend(self) -> bool:
        """Renew the full TTL if still ours; False means another worker may hold it now."""
        return bool(self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    def hold_in_flight(self, seconds: float) -> bool:
        """After a PATCH whose answer we stopped waiting for: nobody, this result's re-run
        included, may call for the receipt for `seconds` (until that PATCH has surely landed
        or failed at the server); then the lock frees itself."""
        return bool(self._hold_in_flight(keys=[self.key], args=[self.token, int(seconds * 1000)]))

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
