"""The fake Clopos API's state and behaviour, without HTTP: brands, receipts, tokens, the
rate limits, the injected faults and the statistics. `app.py` puts it on the wire,
`serving.py` runs it; the package docstring lists the routes.

Choices where the real API is silent:
- A non-integer receipt id answers 404 not_found (after the token and the budget checks).
- All timestamps are UTC. The fake integrator is always in test mode, so a brand with
  `production: true` gets the documented 200 + success:false from /v2/auth.
- Processing order of an authenticated call: flood guard -> per-brand budget (for a token
  the fake issued, even if expired or revoked) -> token validity -> brand-wide failure ->
  per-receipt fail_next / success_false -> x-venue, validation, lookup, update.
- Counted in the brand budget: every call carrying a token the fake issued that was not
  rejected with a 429 by the budget or the flood guard (401s and injected faults count).
  Calls with a missing or never-issued token cannot be attributed to a brand: they count
  only in the flood guard and carry the flood tier's RateLimit headers.
- RateLimit-Reset = whole seconds until Remaining next grows: until the oldest counted
  request leaves the window; when the budget is exhausted, until enough have left for one
  more request to fit (always >= 1 then, and equal to Retry-After on a 429). With
  set_external_usage, Limit stays nominal while Remaining/enforcement use limit - used.
  An injected 429 (fail_next / fail_brand) carries Retry-After = RateLimit-Reset = 1 and
  Remaining 0; every other injected status carries the budget's real headers.
- Flood guard: once `flood_limit` failed (>= 400) authenticated calls of an IP are in the
  window, every authenticated call of that IP gets 429 until enough leave. The guard's own
  429s are not counted as failures, so the block does end; budget 429s are counted.
- Auth is limited per client IP (`auth_limit` per `auth_window`); its 429s are counted in
  stats["rate_limited"]["_auth"], flood-guard 429s under "_flood".
- Latency (global, per brand, or per receipt; per method or "ANY") applies to /v2/auth too.
  slow_next delays only the next `count` calls of one receipt, then they are served
  normally: a call the client gave up on (read timeout) is still applied, late.
- A revoked token answers, per revoke_tokens(status=...): 401 invalid_token (default),
  403 forbidden, or any other status with {"success": false, "error": <error>} (200 with
  error "token_expired" by default) -- the non-401 ways gateways report a dead token.
- stats()["receipts"][...]["get"/"patch"/"patch_bodies"] count calls with a valid token
  within the budget, whatever their outcome (faults, 400, 404 included); a body that is
  not a JSON object is recorded as {"_raw": <text or value>}. "patch_ok" counts the
  PATCHes that changed the receipt, "patched_at" their unix times (when applied).
- issued_tokens() lists every token the fake issued (tests look for leaks of them).

Seed format (JSON; `load_seed`, `serve(seed_path=...)`):
    {
      "integrator_id": "fake-integrator",
      "brands": {"<brand>": {"client_id": "...", "client_secret": "...",
                             "default_venue_id": 1, "production": false}},
      "receipts": [
        {"brand": "<brand>", "id": 1, ...any receipt fields (defaults fill the rest)...,
         "fault": {"appear_after": 5}                     # seconds after loading
                | {"close_after": 3}                      # open until then, then closed
                | {"fail_next": {"status": 500, "count": 2, "method": "PATCH", "body": {...}}}
                | {"success_false": {"error": "some_id", "count": 1}}
                | {"latency": 0.5}}                       # or {"seconds": 0.5, "method": "GET"}
      ]
    }
`fault` is optional and may combine several keys; `brand` may be left out when the seed
has exactly one brand. Missing receipt fields get defaults (see `_fill_receipt`): closed
(status 2) unless status 1 or closed_at null is given, fiscal_id null, lock false.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ORDER_STATUSES = frozenset(
    {"NEW", "SCHEDULED", "IN_PROGRESS", "READY", "PICKED_UP", "COMPLETED", "CANCELLED"}
)
AUTH_FIELDS = ("client_id", "client_secret", "brand", "integrator_id")
METHODS = frozenset({"ANY", "GET", "PATCH", "POST"})
REQUEST_LOG_MAX = 100_000  # entries of stats()["request_log"] kept (the newest)
TOKEN_TABLE_PRUNE_AT = 10_000  # issued tokens kept before long-expired ones are dropped
TOKEN_FORGET_AFTER = 600.0  # seconds an expired token still answers token_expired
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"

ERROR_IDS = {
    400: "validation_failed",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    429: "rate_limited",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_MESSAGES = {
    400: "Invalid field values provided",
    401: "Invalid token",
    403: "Forbidden",
    404: "Receipt not found",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Upstream did not answer in time",
}
# Products of the default receipts: (name, price in minor units).
_MENU = (("Americano", 450), ("Cheesecake", 750), ("Lemonade", 380), ("Club sandwich", 1150))


@dataclass
class _Brand:
    client_id: str
    client_secret: str
    default_venue_id: int
    production: bool


@dataclass
class _Token:
    brand: str
    venue_id: int
    expires: float  # monotonic
    revoked: bool = False
    revoked_status: int = 401
    revoked_error: str | None = None


@dataclass
class _ReceiptFault:
    method: str
    count: int
    status: int
    body: dict[str, Any]


@dataclass
class _BrandFault:
    status: int
    until: float | None  # monotonic
    remaining: int | None


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceiptCall:
    """A GET/PATCH of a receipt between `open_receipt_call` and `close_receipt_call`."""

    delay: float  # seconds to wait before `serve_receipt` (latency, slow_next)
    patching: tuple[str, int] | None  # (brand, receipt id) of a PATCH counted as in flight


class CloposModel:
    """The fake API: every request's effect, its state guarded by one threading.Lock.

    The HTTP layer calls `auth_delay` + `authenticate` for POST /v2/auth and
    `open_receipt_call` + `serve_receipt` + `close_receipt_call` for a receipt, sleeping
    the returned delays in between (the lock is never held across that wait).
    """

    def __init__(
        self,
        *,
        integrator_id: str = "fake-integrator",
        brands: dict[str, dict[str, Any]] | None = None,
        token_lifetime: float = 3600.0,
        rate_limit: int = 300,
        rate_window: float = 60.0,
        auth_limit: int = 60,
        auth_window: float = 60.0,
        flood_limit: int = 600,
        flood_window: float = 60.0,
        latency: float = 0.0,
    ) -> None:
        self.integrator_id = integrator_id
        self.token_lifetime = token_lifetime
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.auth_limit = auth_limit
        self.auth_window = auth_window
        self.flood_limit = flood_limit
        self.flood_window = flood_window
        self._base_latency = latency
        # Never held across an await: the event loop thread and test threads share it.
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._brands: dict[str, _Brand] = {}
        self._receipts: dict[tuple[str, int], dict[str, Any]] = {}
        self._tokens: dict[str, _Token] = {}
        self._budget_logs: dict[str, deque[float]] = defaultdict(deque)
        self._auth_logs: dict[str, deque[float]] = defaultdict(deque)
        self._flood_logs: dict[str, deque[float]] = defaultdict(deque)
        self._in_flight: dict[tuple[str, int], int] = defaultdict(int)
        self._clear_faults()
        self._clear_stats()
        for name, config in (brands or {}).items():
            self.add_brand(name, **config)

    # --- setup -----------------------------------------------------------------------

    def add_brand(
        self,
        brand: str,
        client_id: str,
        client_secret: str,
        default_venue_id: int = 1,
        production: bool = False,
    ) -> None:
        with self._lock:
            self._brands[brand] = _Brand(client_id, client_secret, default_venue_id, production)

    def brands(self) -> list[str]:
        with self._lock:
            return sorted(self._brands)

    def add_receipt(self, brand: str, receipt: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            info = self._brands.get(brand)
            if info is None:
                raise KeyError(f"unknown brand {brand!r}")
            stored = _fill_receipt(brand, receipt, info.default_venue_id, _format_time(time.time()))
            key = (brand, stored["id"])
            self._receipts[key] = stored
            self._close_at.pop(key, None)  # a replaced receipt is authoritative as given
            return copy.deepcopy(stored)

    def receipt(self, brand: str, receipt_id: int) -> dict[str, Any] | None:
        with self._lock:
            stored = self._stored(brand, receipt_id, time.monotonic())
            return copy.deepcopy(stored) if stored is not None else None

    def load_seed(self, seed: dict[str, Any]) -> None:
        if not isinstance(seed, dict):
            raise ValueError("seed: must be a JSON object")
        if "integrator_id" in seed:
            self.integrator_id = str(seed["integrator_id"])
        for name, config in (seed.get("brands") or {}).items():
            try:
                self.add_brand(name, **config)
            except TypeError as exc:
                raise ValueError(f"seed: brand {name!r}: {exc}") from exc
        names = self.brands()
        only_brand = names[0] if len(names) == 1 else None
        for entry in seed.get("receipts") or []:
            receipt = dict(entry)
            brand = receipt.pop("brand", only_brand)
            fault = receipt.pop("fault", None) or {}
            stored = self.add_receipt(brand, receipt)
            self._apply_seed_fault(brand, stored["id"], fault)

    def _apply_seed_fault(self, brand: str, receipt_id: int, fault: dict[str, Any]) -> None:
        actions: dict[str, Callable[[Any], None]] = {
            "appear_after": lambda arg: self.appear_after(brand, receipt_id, float(arg)),
            "close_after": lambda arg: self.close_after(brand, receipt_id, float(arg)),
            "fail_next": lambda arg: self.fail_next(brand, receipt_id, **arg),
            "success_false": lambda arg: self.success_false(brand, receipt_id, **arg),
            "latency": lambda arg: (
                self.set_latency(brand=brand, receipt_id=receipt_id, **arg)
                if isinstance(arg, dict)
                else self.set_latency(float(arg), brand, receipt_id)
            ),
        }
        for kind, arg in fault.items():
            if kind not in actions:
                raise ValueError(f"seed: receipt {brand}:{receipt_id}: unknown fault {kind!r}")
            actions[kind](arg)

    # --- fault injection ---------------------------------------------------------------

    def fail_next(
        self,
        brand: str,
        receipt_id: int,
        status: int,
        count: int = 1,
        method: str = "ANY",
        body: dict[str, Any] | None = None,
    ) -> None:
        reply = body if body is not None else _error_for(status)
        self._queue_fault(brand, receipt_id, _ReceiptFault(method, count, status, reply))

    def success_false(
        self, brand: str, receipt_id: int, error: str | None, count: int = 1, method: str = "ANY"
    ) -> None:
        reply = error_body(error, "The request could not be completed")
        self._queue_fault(brand, receipt_id, _ReceiptFault(method, count, 200, reply))

    def _queue_fault(self, brand: str, receipt_id: int, fault: _ReceiptFault) -> None:
        fault.method = _check_method(fault.method)
        if fault.count < 1 or not 100 <= fault.status <= 599:
            raise ValueError("count must be >= 1 and status an HTTP status")
        with self._lock:
            self._receipt_faults[(brand, int(receipt_id))].append(fault)

    def set_latency(
        self,
        seconds: float,
        brand: str | None = None,
        receipt_id: int | None = None,
        method: str = "ANY",
    ) -> None:
        if receipt_id is not None and brand is None:
            raise ValueError("a per-receipt latency needs the brand")
        key = (brand, None if receipt_id is None else int(receipt_id), _check_method(method))
        with self._lock:
            self._latency[key] = float(seconds)

    def slow_next(
        self, brand: str, receipt_id: int, seconds: float, count: int = 1, method: str = "ANY"
    ) -> None:
        """Delay the receipt's next `count` calls (of `method`) by `seconds`, once each."""
        if count < 1 or seconds < 0:
            raise ValueError("count must be >= 1 and seconds >= 0")
        with self._lock:
            self._slow_next[(brand, int(receipt_id))].append(
                [_check_method(method), int(count), float(seconds)]
            )

    def appear_after(self, brand: str, receipt_id: int, seconds: float) -> None:
        with self._lock:
            self._appear_at[(brand, int(receipt_id))] = time.monotonic() + seconds

    def close_after(self, brand: str, receipt_id: int, seconds: float) -> None:
        key = (brand, int(receipt_id))
        with self._lock:
            stored = self._receipts.get(key)
            if stored is None:
                raise KeyError(f"no receipt {brand}:{receipt_id}")
            stored.update(status=1, closed_at=None)
            self._close_at[key] = (time.monotonic() + seconds, time.time() + seconds)

    def fail_brand(
        self, brand: str, status: int, duration: float | None = None, count: int | None = None
    ) -> None:
        # Ends when either the duration or the count runs out; neither = until reset_faults.
        until = None if duration is None else time.monotonic() + duration
        with self._lock:
            if count is not None and count < 1:
                self._brand_faults.pop(brand, None)
                return
            self._brand_faults[brand] = _BrandFault(status, until, count)

    def reject_auth(self, brand: str, enabled: bool = True) -> None:
        with self._lock:
            if enabled:
                self._auth_rejected_brands.add(brand)
            else:
                self._auth_rejected_brands.discard(brand)

    def revoke_tokens(self, brand: str, status: int = 401, error: str | None = None) -> None:
        """Revoke the brand's tokens issued so far; calls with them answer `status`
        (401 invalid_token, 403 forbidden, else {"success": false, "error": error})"""
        if not 100 <= int(status) <= 599:
            raise ValueError("status must be an HTTP status")
        with self._lock:
            for token in self._tokens.values():
                if token.brand == brand:
                    token.revoked = True
                    token.revoked_status = int(status)
                    token.revoked_error = error

    def issued_tokens(self, brand: str | None = None) -> list[str]:
        """Every token issued (and not yet forgotten), oldest first; of one brand if given."""
        with self._lock:
            return [t for t, info in self._tokens.items() if brand in (None, info.brand)]

    def set_external_usage(self, brand: str, used: int) -> None:
        with self._lock:
            self._external_usage[brand] = max(0, int(used))

    def reset_faults(self) -> None:
        """Clear every injected fault; latency returns to the constructor's; revocations stay."""
        with self._lock:
            self._clear_faults()

    def _clear_faults(self) -> None:
        self._receipt_faults: dict[tuple[str, int], list[_ReceiptFault]] = defaultdict(list)
        self._latency: dict[tuple[str | None, int | None, str], float] = {
            (None, None, "ANY"): self._base_latency
        }
        self._slow_next: dict[tuple[str, int], list[list[Any]]] = defaultdict(list)
        self._appear_at: dict[tuple[str, int], float] = {}
        self._close_at: dict[tuple[str, int], tuple[float, float]] = {}
        self._brand_faults: dict[str, _BrandFault] = {}
        self._auth_rejected_brands: set[str] = set()
        self._external_usage: dict[str, int] = {}

    # --- observation -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "auth_calls": dict(self._auth_calls),
                "auth_rejected": dict(self._auth_rejected),
                "receipts": {
                    f"{brand}:{rid}": copy.deepcopy(entry)
                    for (brand, rid), entry in self._receipt_stats.items()
                },
                "rate_limited": dict(self._rate_limited),
                "requests": dict(self._requests),
                "failed": dict(self._failed),
                "max_concurrent_patches": self._max_concurrent,
                "request_log": [list(entry) for entry in self._request_log],
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._clear_stats()

    def _clear_stats(self) -> None:
        self._auth_calls: dict[str, int] = defaultdict(int)
        self._auth_rejected: dict[str, int] = defaultdict(int)
        self._receipt_stats: dict[tuple[str, int], dict[str, Any]] = {}
        self._rate_limited: dict[str, int] = defaultdict(int)
        self._requests: dict[str, int] = defaultdict(int)
        self._failed: dict[str, int] = defaultdict(int)
        self._max_concurrent = 0
        self._request_log: deque[list[Any]] = deque(maxlen=REQUEST_LOG_MAX)

    def _receipt_entry(self, brand: str, receipt_id: int) -> dict[str, Any]:
        return self._receipt_stats.setdefault(
            (brand, receipt_id),
            {
                "get": 0,
                "patch": 0,
                "patch_bodies": [],
                "max_concurrent_patches": 0,
                "patch_ok": 0,
                "patched_at": [],
            },
        )

    # --- POST /v2/auth -----------------------------------------------------------------

    def auth_delay(self, body: Any) -> float:
        """Seconds to wait before answering this /v2/auth body (the injected latency)."""
        with self._lock:
            return self._latency_for(_auth_brand(body), None, "POST")

    def authenticate(self, ip: str, body: Any) -> Reply:
        """The answer to POST /v2/auth from `ip` with this JSON body (None: not JSON)."""
        brand = _auth_brand(body)
        with self._lock:
            reply = self._authenticate(ip, body, brand)
            self._request_log.append([time.time(), "POST", brand, None, reply.status])
        return reply

    def _authenticate(self, ip: str, body: Any, brand: str | None) -> Reply:
        now = time.monotonic()
        log = self._auth_logs[ip]
        _prune(log, now, self.auth_window)
        if brand is not None:
            self._auth_calls[brand] += 1
        if len(log) >= self.auth_limit:
            self._rate_limited["_auth"] += 1
            reply = Reply(429, error_body("rate_limited", "Too many authentication requests"))
        else:
            log.append(now)
            reply = self._auth_decision(body, brand, now)
        if brand is not None and not reply.body.get("success"):
            self._auth_rejected[brand] += 1
        reset = _reset_after(log, now, self.auth_window, self.auth_limit)
        reply.headers.update(_rate_headers(self.auth_limit, self.auth_limit - len(log), reset))
        if reply.status == 429:
            reply.headers["Retry-After"] = str(reset)
        return reply

    def _auth_decision(self, body: Any, brand: str | None, now: float) -> Reply:
        if not isinstance(body, dict) or any(not isinstance(body.get(f), str) for f in AUTH_FIELDS):
            message = "client_id, client_secret, brand and integrator_id are required strings"
            return Reply(400, error_body("validation_failed", message))
        if body["integrator_id"] != self.integrator_id:
            return Reply(400, error_body("invalid_integrator", "Unknown integrator"))
        info = self._brands.get(body["brand"])
        if (
            info is None
            or brand in self._auth_rejected_brands
            or not hmac.compare_digest(body["client_id"], info.client_id)
            or not hmac.compare_digest(body["client_secret"], info.client_secret)
        ):
            return Reply(401, error_body("authentication_failed", "Invalid credentials"))
        if info.production:  # documented quirk: 200 with success false
            message = "Integrator is in test mode and cannot access a production brand"
            return Reply(200, error_body("authentication_failed", message))
        return Reply(200, self._issue_token(body["brand"], info.default_venue_id, now))

    def _issue_token(self, brand: str, venue_id: int, now: float) -> dict[str, Any]:
        issued = time.time()
        expires_at = int(issued + self.token_lifetime)  # rounded down: never later than real
        token = self._sign(
            {
                "iss": "fake-clopos",
                "integrator_id": self.integrator_id,
                "brand": brand,
                "venue_id": venue_id,
                "iat": int(issued),
                "exp": expires_at,
                "jti": uuid.uuid4().hex,
            }
        )
        if len(self._tokens) >= TOKEN_TABLE_PRUNE_AT:
            self._forget_old_tokens(now)
        self._tokens[token] = _Token(brand, venue_id, now + self.token_lifetime)
        return {
            "success": True,
            "token": token,
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime),
            "expires_at": expires_at,
            "message": "Authentication successful",
        }

    def _sign(self, payload: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")))
        body = _b64url(json.dumps(payload, separators=(",", ":")))
        digest = hmac.new(self._secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64url(digest)}"

    def _forget_old_tokens(self, now: float) -> None:
        for token, info in list(self._tokens.items()):
            if info.expires + TOKEN_FORGET_AFTER < now:
                del self._tokens[token]

    # --- GET / PATCH /v2/receipts/{id} -------------------------------------------------

    def open_receipt_call(
        self, method: str, token: str | None, receipt_id: int | None
    ) -> ReceiptCall:
        """Start a GET/PATCH: its delay, and a PATCH counted as in flight from now (before
        the delay, so overlapping PATCHes show) until `close_receipt_call`."""
        with self._lock:
            known = self._tokens.get(token) if token else None
            brand = known.brand if known else None
            delay = self._latency_for(brand, receipt_id, method)
            if brand is not None and receipt_id is not None:
                delay = max(delay, self._take_slow(brand, receipt_id, method))
            tracked = None
            if method == "PATCH" and brand is not None and receipt_id is not None:
                tracked = (brand, receipt_id)
                self._enter_patch(tracked)
        return ReceiptCall(delay, tracked)

    def close_receipt_call(self, call: ReceiptCall) -> None:
        if call.patching is not None:
            with self._lock:
                self._in_flight[call.patching] -= 1

    def serve_receipt(
        self,
        ip: str,
        method: str,
        token: str | None,
        receipt_id: int | None,
        venue_header: str | None,
        patch: tuple[dict[str, Any], dict[str, Any] | None] | None,
    ) -> Reply:
        """The answer to a GET/PATCH of a receipt (`patch`: `parse_patch` of the body)."""
        with self._lock:
            return self._serve_receipt(ip, method, token, receipt_id, venue_header, patch)

    def _enter_patch(self, key: tuple[str, int]) -> None:
        self._in_flight[key] += 1
        entry = self._receipt_entry(*key)
        entry["max_concurrent_patches"] = max(entry["max_concurrent_patches"], self._in_flight[key])
        self._max_concurrent = max(self._max_concurrent, self._in_flight[key])

    def _serve_receipt(
        self,
        ip: str,
        method: str,
        token: str | None,
        receipt_id: int | None,
        venue_header: str | None,
        patch: tuple[dict[str, Any], dict[str, Any] | None] | None,
    ) -> Reply:
        now = time.monotonic()
        known = self._tokens.get(token) if token else None
        brand = known.brand if known else None
        reply = self._flood_block(ip, now)
        if reply is not None:
            self._record(ip, brand, method, receipt_id, reply, now, counts_as_failure=False)
            return reply
        headers: dict[str, str] = {}
        if brand is not None:
            reply = self._take_budget(brand, now, headers)
        reply = reply or _token_problem(known, token, now)
        if reply is None and known is not None:
            self._count_receipt_call(known.brand, receipt_id, method, patch)
            reply = (
                self._brand_fault(known.brand, now)
                or self._receipt_fault(known.brand, receipt_id, method)
                or self._handle(known, method, receipt_id, venue_header, patch, now)
            )
        assert reply is not None
        reply.headers = headers | reply.headers  # an injected 429 keeps its own reset
        self._record(ip, brand, method, receipt_id, reply, now, counts_as_failure=True)
        if brand is None:  # unattributable: the flood tier is the one that applies
            reply.headers.update(self._flood_headers(ip, now))
        return reply

    def _handle(
        self,
        token: _Token,
        method: str,
        receipt_id: int | None,
        venue_header: str | None,
        patch: tuple[dict[str, Any], dict[str, Any] | None] | None,
        now: float,
    ) -> Reply:
        venue = token.venue_id
        if venue_header is not None:
            try:
                venue = int(venue_header)
            except ValueError:
                return Reply(400, error_body("validation_failed", "Invalid x-venue header"))
        update = patch[1] if patch is not None else None
        if method == "PATCH" and update is None:
            return Reply(400, error_body("validation_failed", _MESSAGES[400]))
        receipt = self._visible(token.brand, receipt_id, venue, now)
        if receipt is None:
            return Reply(404, error_body("not_found", "Receipt not found"))
        if update is None:
            return Reply(200, _envelope(copy.deepcopy(receipt), "Receipt retrieved successfully"))
        receipt.update(update)
        applied = time.time()
        receipt["updated_at"] = _format_time(applied)
        entry = self._receipt_entry(token.brand, receipt["id"])
        entry["patch_ok"] += 1
        entry["patched_at"].append(applied)
        return Reply(200, _envelope(copy.deepcopy(receipt), "Operation completed successfully"))

    def _visible(
        self, brand: str, receipt_id: int | None, venue: int, now: float
    ) -> dict[str, Any] | None:
        if receipt_id is None or now < self._appear_at.get((brand, receipt_id), 0.0):
            return None
        stored = self._stored(brand, receipt_id, now)
        return stored if stored is not None and stored.get("venue_id") == venue else None

    def _stored(self, brand: str, receipt_id: int, now: float) -> dict[str, Any] | None:
        key = (brand, receipt_id)
        stored = self._receipts.get(key)
        closing = self._close_at.get(key)
        if stored is not None and closing is not None and now >= closing[0]:
            closed_at = _format_time(closing[1])
            stored.update(status=2, closed_at=closed_at, updated_at=closed_at)
            del self._close_at[key]
        return stored

    def _count_receipt_call(
        self,
        brand: str,
        receipt_id: int | None,
        method: str,
        patch: tuple[dict[str, Any], dict[str, Any] | None] | None,
    ) -> None:
        if receipt_id is None:
            return
        entry = self._receipt_entry(brand, receipt_id)
        if method == "GET":
            entry["get"] += 1
            return
        entry["patch"] += 1
        if patch is not None:
            entry["patch_bodies"].append(copy.deepcopy(patch[0]))

    def _brand_fault(self, brand: str, now: float) -> Reply | None:
        fault = self._brand_faults.get(brand)
        if fault is None:
            return None
        if fault.until is not None and now >= fault.until:
            del self._brand_faults[brand]
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._brand_faults[brand]
        return _fault_reply(fault.status, _error_for(fault.status))

    def _receipt_fault(self, brand: str, receipt_id: int | None, method: str) -> Reply | None:
        queue = self._receipt_faults.get((brand, receipt_id)) if receipt_id is not None else None
        for fault in queue or []:
            if fault.method in ("ANY", method):
                fault.count -= 1
                if fault.count <= 0:
                    queue.remove(fault)  # type: ignore[union-attr]
                return _fault_reply(fault.status, copy.deepcopy(fault.body))
        return None

    def _take_slow(self, brand: str, receipt_id: int, method: str) -> float:
        queue = self._slow_next.get((brand, receipt_id))
        for slow in queue or []:
            if slow[0] in ("ANY", method):
                slow[1] -= 1
                if slow[1] <= 0:
                    queue.remove(slow)  # type: ignore[union-attr]
                return float(slow[2])
        return 0.0

    def _latency_for(self, brand: str | None, receipt_id: int | None, method: str) -> float:
        candidates = [(None, None, method), (None, None, "ANY")]
        if brand is not None:
            candidates[:0] = [(brand, None, method), (brand, None, "ANY")]
            if receipt_id is not None:
                candidates[:0] = [(brand, receipt_id, method), (brand, receipt_id, "ANY")]
        for key in candidates:
            if key in self._latency:
                return self._latency[key]
        return 0.0

    # --- rate limits -------------------------------------------------------------------

    def _take_budget(self, brand: str, now: float, headers: dict[str, str]) -> Reply | None:
        log = self._budget_logs[brand]
        _prune(log, now, self.rate_window)
        limit = max(0, self.rate_limit - self._external_usage.get(brand, 0))
        over = len(log) >= limit
        if not over:
            log.append(now)
        reset = _reset_after(log, now, self.rate_window, limit)
        headers.update(_rate_headers(self.rate_limit, limit - len(log), reset))
        if not over:
            return None
        self._rate_limited[brand] += 1
        headers["Retry-After"] = str(reset)
        return Reply(429, error_body("rate_limited", "Too many requests for this brand"))

    def _flood_block(self, ip: str, now: float) -> Reply | None:
        log = self._flood_logs[ip]
        _prune(log, now, self.flood_window)
        if len(log) < self.flood_limit:
            return None
        self._rate_limited["_flood"] += 1
        headers = self._flood_headers(ip, now)
        headers["Retry-After"] = headers["RateLimit-Reset"]
        return Reply(429, error_body("rate_limited", "Too many failed requests"), headers)

    def _flood_headers(self, ip: str, now: float) -> dict[str, str]:
        log = self._flood_logs[ip]
        reset = _reset_after(log, now, self.flood_window, self.flood_limit)
        return _rate_headers(self.flood_limit, self.flood_limit - len(log), reset)

    def _record(
        self,
        ip: str,
        brand: str | None,
        method: str,
        receipt_id: int | None,
        reply: Reply,
        now: float,
        *,
        counts_as_failure: bool,
    ) -> None:
        failed = reply.status >= 400
        if brand is not None:
            self._requests[brand] += 1
            if failed:
                self._failed[brand] += 1
        if failed and counts_as_failure:
            self._flood_logs[ip].append(now)
        self._request_log.append([time.time(), method, brand, receipt_id, reply.status])

    # --- the fault kinds (seed `fault`, POST /_fake/faults) ---------------------------

    def fault_actions(self) -> dict[str, Callable[..., None]]:
        return {
            "fail_next": self.fail_next,
            "success_false": self.success_false,
            "latency": self.set_latency,
            "slow_next": self.slow_next,
            "appear_after": self.appear_after,
            "close_after": self.close_after,
            "fail_brand": self.fail_brand,
            "reject_auth": self.reject_auth,
            "revoke_tokens": self.revoke_tokens,
            "external_usage": self.set_external_usage,
        }


def default_seed() -> dict[str, Any]:
    """Brand "openapitest" (demo-client / demo-secret), receipts 1..20 closed, no fiscal_id."""
    return {
        "integrator_id": "fake-integrator",
        "brands": {
            "openapitest": {
                "client_id": "demo-client",
                "client_secret": "demo-secret",
                "default_venue_id": 1,
                "production": False,
            }
        },
        "receipts": [{"brand": "openapitest", "id": rid} for rid in range(1, 21)],
    }


# --- helpers -------------------------------------------------------------------------


def _fill_receipt(brand: str, given: dict[str, Any], venue_id: int, now: str) -> dict[str, Any]:
    """The stored receipt: what was given, plus the fields a real POS receipt carries."""
    receipt = copy.deepcopy(given)
    rid = receipt.get("id")
    if type(rid) is not int or rid < 1:
        raise ValueError("receipt id must be an integer >= 1")
    open_given = receipt.get("status") == 1 or ("closed_at" in receipt and not receipt["closed_at"])
    closed = not open_given
    products = receipt.setdefault("products", _default_products(rid))
    subtotal = receipt.setdefault("subtotal", _products_total(products))
    service_charge = receipt.setdefault("service_charge", 0)
    discount = receipt.setdefault("discount", 0)
    total = receipt.setdefault("total", subtotal + service_charge - discount)
    defaults = {
        "id": rid,
        "cid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fake-clopos/{brand}/{rid}")),
        "venue_id": venue_id,
        "status": 2 if closed else 1,
        "closed_at": now if closed else None,
        "fiscal_id": None,
        "lock": False,
        "order_status": "COMPLETED" if closed else "IN_PROGRESS",
        "order_number": str(rid),
        "created_at": now,
        "updated_at": now,
        "type": "IN",
        "source": "POS",
        "guests": 1 + rid % 4,
        "table_id": None,
        "terminal_id": 1,
        "user_id": 1,
        "customer_id": None,
        "currency": "AZN",
        "payment_methods": [{"id": 1, "name": "Cash", "amount": total}],
        "description": None,
        "deleted_at": None,
    }
    return defaults | receipt


def _default_products(rid: int) -> list[dict[str, Any]]:
    items = []
    for line in range(1 + rid % 3):
        name, price = _MENU[(rid + line) % len(_MENU)]
        count = 1 + (rid + line) % 2
        items.append(
            {
                "id": rid * 10 + line,
                "product_id": 100 + (rid + line) % len(_MENU),
                "name": name,
                "count": count,
                "price": price,
                "discount": 0,
                "total": count * price,
            }
        )
    return items


def _products_total(products: Any) -> int:
    lines = products if isinstance(products, list) else []
    return sum(
        line["total"]
        for line in lines
        if isinstance(line, dict) and isinstance(line.get("total"), int)
    )


def parse_patch(raw: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(what patch_bodies records, the validated update or None if it is invalid)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"_raw": raw.decode("utf-8", "replace")}, None
    if not isinstance(body, dict):
        return {"_raw": body}, None
    return body, (body if _valid_update(body) else None)


def _valid_update(body: dict[str, Any]) -> bool:
    if not body or not set(body) <= _PATCH_CHECKS.keys():
        return False
    return all(_PATCH_CHECKS[name](value) for name, value in body.items())


_PATCH_CHECKS: dict[str, Callable[[Any], bool]] = {
    "fiscal_id": lambda v: isinstance(v, str) and v.strip() != "",
    "lock": lambda v: type(v) is bool,  # exact: isinstance(1, bool) is false but True is an int
    "order_status": lambda v: isinstance(v, str) and v in ORDER_STATUSES,
    "order_number": lambda v: isinstance(v, str),
}


def _auth_brand(body: Any) -> str | None:
    brand = body.get("brand") if isinstance(body, dict) else None
    return brand if isinstance(brand, str) else None


def _token_problem(token: _Token | None, raw: str | None, now: float) -> Reply | None:
    if token is None:
        message = "Invalid token" if raw else "Missing x-token header"
        return Reply(401, error_body("invalid_token", message))
    if token.revoked:
        if token.revoked_status == 401:
            return Reply(401, error_body("invalid_token", "Token has been revoked"))
        if token.revoked_status == 403:
            return Reply(
                403, error_body(token.revoked_error or "forbidden", "Token has been revoked")
            )
        error = token.revoked_error or "token_expired"
        return Reply(token.revoked_status, error_body(error, "Token has been revoked"))
    if now >= token.expires:
        return Reply(401, error_body("token_expired", "Token has expired"))
    return None


def _prune(log: deque[float], now: float, window: float) -> None:
    while log and log[0] <= now - window:
        log.popleft()


def _reset_after(log: deque[float], now: float, window: float, limit: int) -> int:
    """Whole seconds until Remaining grows (>= 1 when exhausted; 0 when nothing is counted)."""
    if limit <= 0:
        return max(1, math.ceil(window))
    if len(log) >= limit:
        return max(1, math.ceil(log[len(log) - limit] + window - now))
    return math.ceil(log[0] + window - now) if log else 0


def _rate_headers(limit: int, remaining: int, reset: int) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(reset),
    }


def error_body(error: str | None, message: str) -> dict[str, Any]:
    body: dict[str, Any] = {"success": False}
    if error is not None:  # the real envelope has `error` only "when present"
        body["error"] = error
    body["message"] = message
    return body


def _fault_reply(status: int, body: dict[str, Any]) -> Reply:
    if status != 429:
        return Reply(status, body)
    # An injected 429 says "retry in 1 s", not the (unexhausted) budget's own reset.
    headers = {"RateLimit-Remaining": "0", "RateLimit-Reset": "1", "Retry-After": "1"}
    return Reply(status, body, headers)


def _error_for(status: int) -> dict[str, Any]:
    return error_body(ERROR_IDS.get(status, "error"), _MESSAGES.get(status, "Request failed"))


def _envelope(data: dict[str, Any], message: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "success": True,
        "data": data,
        "message": message,
        "time": now.strftime(DATETIME_FORMAT),
        "timestamp": now.isoformat(),
        "unix": int(now.timestamp()),
    }


def _format_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime(DATETIME_FORMAT)


def _b64url(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _check_method(method: str) -> str:
    upper = str(method).upper()
    if upper not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}")
    return upper
