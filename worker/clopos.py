"""Clopos Open API v2 client: auth, GET and PATCH receipt, every failure typed.

One `httpx.Client` per process (connection pooling), explicit timeouts (read above the
API's 8 s upstream limit). Responses go through `classify()`, a pure function that turns
(status, body, headers) into success or one of the errors of `worker.errors`; a 200 whose
body says `"success": false` is a failure too. Tokens come from a `TokenProvider` shared
through Redis; an auth-class answer to a call (401, 403, success:false with a token
error) invalidates the shared token and the call is retried once with a fresh one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from worker.errors import (
    AuthError,
    CloposError,
    NotReadyError,
    PermanentError,
    RateLimitedError,
    RateLimitInfo,
    TransientError,
)
from worker.logs import kv, register_secret
from worker.settings import BrandCredentials

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = frozenset({"fiscal_id", "lock", "order_status", "order_number"})
DEFAULT_RETRY_AFTER = 1.0  # seconds to wait on a 429 that names no reset time
AUTH_ERROR_CODES = frozenset({"authentication_failed", "unauthorized", "forbidden"})


@dataclass(frozen=True)
class ApiResponse:
    status: int
    data: dict[str, Any]
    rate: RateLimitInfo


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # unix seconds, on our clock
    lifetime: float  # seconds it was issued for

    def __repr__(self) -> str:  # never show the JWT
        return f"Token(expires_at={self.expires_at:.0f}, lifetime={self.lifetime:.0f})"


class TokenSource:
    """What the client needs from a token provider (see worker.tokens.TokenProvider)."""

    def get(self, brand: str) -> str:  # pragma: no cover - protocol
        raise NotImplementedError

    def invalidate(self, brand: str, token: str) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


class CallGate(Protocol):
    """What a caller hands the client to govern one call's requests (the pipeline's run):
    `before_call` before the token is fetched (budget, breaker: it may raise Deferred, so a
    brand that may not call costs no /v2/auth); `before_send` right before the request goes
    (a fence: it may raise to stop it)."""

    def before_call(self) -> None: ...

    def before_send(self) -> None: ...


# Called after every authenticated response (rate budget, metrics); must not raise.
ResponseHook = Callable[[str, str, int | None, RateLimitInfo], None]


def parse_rate_headers(headers: Mapping[str, str]) -> RateLimitInfo:
    def number(name: str) -> float | None:
        raw = headers.get(name)
        if raw is None:
            return None
        try:
            value = float(raw.strip())
        except ValueError:
            return None
        return value if value >= 0 else None

    limit, remaining = number("ratelimit-limit"), number("ratelimit-remaining")
    return RateLimitInfo(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset_seconds=number("ratelimit-reset"),
    )


def retry_after_seconds(headers: Mapping[str, str], rate: RateLimitInfo) -> float:
    """Seconds a 429 asks us to wait: RateLimit-Reset, else Retry-After, else a default."""
    if rate.reset_seconds is not None:
        return max(rate.reset_seconds, DEFAULT_RETRY_AFTER)
    raw = headers.get("retry-after")
    if raw is not None:
        try:
            return max(float(raw), DEFAULT_RETRY_AFTER)
        except ValueError:
            pass  # an HTTP-date; rare enough to use the default
    return DEFAULT_RETRY_AFTER


def classify(status: int, body: Any, headers: Mapping[str, str]) -> ApiResponse | CloposError:
    """Turn one response into success or a typed error. Pure: no I/O."""
    rate = parse_rate_headers(headers)
    envelope = body if isinstance(body, dict) else None
    code = envelope.get("error") if envelope else None
    code = code if isinstance(code, str) else None
    message = envelope.get("message") if envelope else None
    message = message if isinstance(message, str) else f"HTTP {status}"
    err: dict[str, Any] = {"http_status": status, "error_code": code, "rate": rate}

    if status == 429:
        return RateLimitedError(message, retry_after=retry_after_seconds(headers, rate), **err)
    if status in (401, 403):
        return AuthError(message, **err)
    if status == 404:
        return NotReadyError(message, **err)
    if status in (408, 425) or status >= 500:
        return TransientError(message, **err)
    if 400 <= status < 500:
        return PermanentError(message, **err)
    if envelope is None:
        return TransientError("response body is not a JSON object", **err)
    if envelope.get("success") is not True:
        return _classify_unsuccessful(code, message, err)
    return ApiResponse(status=status, data=envelope, rate=rate)


def _classify_unsuccessful(code: str | None, message: str, err: dict[str, Any]) -> CloposError:
    """A 2xx whose body says success: false, classified by its `error`."""
    if code == "validation_failed":
        return PermanentError(message, **err)
    if code == "not_found":
        return NotReadyError(message, **err)
    if code and (code in AUTH_ERROR_CODES or "token" in code):
        return AuthError(message, **err)
    return TransientError(message, **err)


class CloposClient:
    """Thin typed wrapper over the three v2 calls the worker makes."""

    def __init__(
        self,
        *,
        base_url: str,
        integrator_id: str,
        credentials: Mapping[str, BrandCredentials],
        http: httpx.Client | None = None,
        timeout: float = 12.0,
        connect_timeout: float = 5.0,
        on_response: ResponseHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.integrator_id = integrator_id
        self.credentials = credentials
        self.http = http or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            headers={"accept": "application/json", "user-agent": "fiscal-worker/0.1"},
        )
        self.tokens: TokenSource | None = None
        self.on_response = on_response

    def close(self) -> None:
        self.http.close()

    # --- the three calls ---------------------------------------------------------------
    def authenticate(self, brand: str) -> Token:
        """POST /v2/auth for one brand; raises AuthError (rejected) or TransientError."""
        creds = self.credentials.get(brand)
        if creds is None:
            raise AuthError(f"no credentials for brand {brand!r}", error_code="unknown_brand")
        body = {
            "client_id": creds.client_id,
            "client_secret": creds.client_secret.get_secret_value(),
            "brand": brand,
            "integrator_id": self.integrator_id,
        }
        started = time.time()
        outcome = self._send("POST", "/v2/auth", json=body)
        if isinstance(outcome, CloposError):
            if isinstance(outcome, PermanentError):
                # 400 from /v2/auth: missing fields or a bad integrator, an auth problem.
                outcome = AuthError(
                    outcome.message,
                    http_status=outcome.http_status,
                    error_code=outcome.error_code,
                )
            outcome.call = "auth"
            log.warning(kv("clopos_auth_failed", brand=brand, error=str(outcome)))
            raise outcome
        token = _token_from(outcome.data, started)
        register_secret(token.value)
        log.info(kv("clopos_auth_ok", brand=brand, lifetime=int(token.lifetime)))
        return token

    def get_receipt(
        self,
        brand: str,
        receipt_id: int,
        venue_id: int | None = None,
        gate: CallGate | None = None,
    ) -> ApiResponse:
        return self._authenticated("GET", brand, receipt_id, venue_id, gate=gate)

    def patch_receipt(
        self,
        brand: str,
        receipt_id: int,
        fields: Mapping[str, Any],
        venue_id: int | None = None,
        gate: CallGate | None = None,
    ) -> ApiResponse:
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown or not fields:
            raise ValueError(f"only {sorted(UPDATABLE_FIELDS)} may be sent, got {sorted(fields)}")
        return self._authenticated("PATCH", brand, receipt_id, venue_id, dict(fields), gate)

    # --- plumbing ----------------------------------------------------------------------
    def _authenticated(
        self,
        method: str,
        brand: str,
        receipt_id: int,
        venue_id: int | None,
        body: dict[str, Any] | None = None,
        gate: CallGate | None = None,
    ) -> ApiResponse:
        """One call, and once more with a fresh token after any auth-class answer (401,
        403, or a 200 with success:false and an auth/token error): the token it used is
        dropped from the shared cache (only if it is still that one) and re-fetched."""
        if self.tokens is None:
            raise RuntimeError("CloposClient.tokens is not set")
        path = f"/v2/receipts/{int(receipt_id)}"
        for attempt in (1, 2):
            if gate is not None:
                gate.before_call()  # before the token: no auth call for a brand that may not call
            token = self.tokens.get(brand)
            headers = {"x-token": token}
            if venue_id is not None:
                headers["x-venue"] = str(int(venue_id))
            if gate is not None:
                gate.before_send()
            outcome = self._send(method, path, json=body, headers=headers)
            status = outcome.http_status if isinstance(outcome, CloposError) else outcome.status
            if self.on_response is not None:
                self.on_response(brand, method, status, outcome.rate)
            log.info(
                kv(
                    "clopos_call",
                    brand=brand,
                    receipt_id=receipt_id,
                    method=method,
                    status=status,
                    outcome=outcome.kind if isinstance(outcome, CloposError) else "ok",
                )
            )
            if isinstance(outcome, AuthError) and attempt == 1:
                self.tokens.invalidate(brand, token)  # expired or revoked: one fresh token
                continue
            if isinstance(outcome, CloposError):
                outcome.call = method
                raise outcome
            return outcome
        raise AssertionError("unreachable")

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> ApiResponse | CloposError:
        try:
            response = self.http.request(method, self.base_url + path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            return TransientError(f"timeout: {exc.__class__.__name__}")
        except httpx.HTTPError as exc:
            return TransientError(f"network error: {exc.__class__.__name__}")
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        return classify(response.status_code, body, response.headers)


def _token_from(data: Mapping[str, Any], started: float) -> Token:
    value = data.get("token")
    if not isinstance(value, str) or not value:
        raise TransientError("auth response carries no token", http_status=200)
    expires_in = data.get("expires_in")
    expires_at = data.get("expires_at")
    if isinstance(expires_in, int | float) and expires_in > 0:
        lifetime = float(expires_in)
    elif isinstance(expires_at, int | float) and expires_at > started:
        lifetime = float(expires_at) - started
    else:
        raise TransientError("auth response carries no usable expiry", http_status=200)
    # Our own clock from the moment we asked: skew between hosts cannot stretch a token.
    return Token(value=value, expires_at=started + lifetime, lifetime=lifetime)
