"""The HTTP wire to Clopos: one `httpx.Client` per process, every response classified.

Connection pooling, explicit timeouts (read above the API's 8 s upstream limit). Responses
go through `classify()`, a pure function that turns (status, body, headers) into success or
one of the errors of `worker.errors`; a 200 whose body says `"success": false` is a failure
too. Network errors and timeouts come back as `TransientError`, never raised from httpx.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
from worker.logs import kv

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 12.0  # above the API's 8 s upstream limit, so its 504 reaches us first
CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_RETRY_AFTER = 1.0  # seconds to wait on a 429 that names no reset time
AUTH_ERROR_CODES = frozenset({"authentication_failed", "unauthorized", "forbidden"})


@dataclass(frozen=True)
class ApiResponse:
    status: int
    data: dict[str, Any]
    rate: RateLimitInfo


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


# Called after every request with (method, path, HTTP status or None: no answer, a timeout,
# a lost connection), e.g. to count API calls; must not raise.
AnswerHook = Callable[[str, str, int | None], None]


class Wire:
    """Sends one request to the API root and classifies its answer; never raises for the
    network, never logs a body (it may carry a token)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.Client | None = None,
        timeout: float = READ_TIMEOUT_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        on_answer: AnswerHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.on_answer = on_answer
        self.http = http or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            headers={"accept": "application/json", "user-agent": "fiscal-worker/0.1"},
        )

    def close(self) -> None:
        self.http.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> ApiResponse | CloposError:
        outcome = self._send(method, path, json, headers)
        if self.on_answer is not None:
            status = outcome.http_status if isinstance(outcome, CloposError) else outcome.status
            try:
                self.on_answer(method, path, status)
            except Exception:  # a hook (metrics) never changes what the request did
                log.exception(kv("answer_hook_failed", method=method))
        return outcome

    def _send(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None,
        headers: dict[str, str] | None,
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
