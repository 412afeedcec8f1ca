"""The small typed vocabulary every Clopos failure is turned into.

Nothing above the client looks at HTTP status codes: it catches one of these.

    PermanentError    400 / validation_failed      -> dead-letter at once
    NotReadyError     404 / not_found              -> retry within the not-ready window
    AuthError         401 / authentication_failed  -> re-authenticate once, then auth problem
    RateLimitedError  429                          -> wait `retry_after` s; not a failed attempt
    TransientError    5xx, timeouts, network, bad bodies -> backoff within the transient window
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimitInfo:
    """The `RateLimit-*` headers of one response (None where a header was absent)."""

    limit: int | None = None
    remaining: int | None = None
    reset_seconds: float | None = None


class CloposError(Exception):
    """A Clopos call that did not succeed; `kind` names its class for logs and audit."""

    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        rate: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.error_code = error_code
        self.rate = rate or RateLimitInfo()
        self.call: str | None = None  # "auth", "GET" or "PATCH", set by the client

    def __str__(self) -> str:
        status = f"HTTP {self.http_status}" if self.http_status is not None else "no response"
        code = f" {self.error_code}" if self.error_code else ""
        return f"{status}{code}: {self.message}"


class PermanentError(CloposError):
    kind = "permanent"


class NotReadyError(CloposError):
    kind = "not_ready"


class AuthError(CloposError):
    kind = "auth"


class TransientError(CloposError):
    kind = "transient"


class RateLimitedError(CloposError):
    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class Deferred(Exception):
    """A call may not go now (no budget slot soon, brand paused, circuit open, failed-call
    guard); the result waits until `until` without counting a failed attempt."""

    def __init__(self, until: float, why: str, *, circuit_open: bool = False) -> None:
        super().__init__(why)
        self.until = until
        self.why = why
        self.circuit_open = circuit_open
