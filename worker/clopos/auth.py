"""POST /v2/auth: a brand's credentials in, a `Token` out.

The client_secret goes only into this request's body: never into Redis, a log or an error.
The token's expiry is computed on our own clock from the moment we asked, so clock skew
between hosts cannot stretch it. Sharing tokens between processes is worker.clopos.tokens'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from worker.clopos.wire import Wire
from worker.errors import (
    AuthError,
    CloposError,
    PermanentError,
    RateLimitedError,
    RateLimitInfo,
    TransientError,
)
from worker.logs import kv, register_secret
from worker.settings import BrandCredentials

log = logging.getLogger(__name__)


class RateHook(Protocol):
    """Told every /v2/auth answer's rate headers (`rejected`: a 429): the auth budget."""

    def __call__(self, rate: RateLimitInfo, *, rejected: bool = False) -> None: ...


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # unix seconds, on our clock
    lifetime: float  # seconds it was issued for

    def __repr__(self) -> str:  # never show the JWT
        return f"Token(expires_at={self.expires_at:.0f}, lifetime={self.lifetime:.0f})"


class AuthCaller:
    """Calls /v2/auth for one brand; raises AuthError (rejected, or no credentials) or
    TransientError (network, 5xx, an answer without a usable token)."""

    def __init__(
        self,
        wire: Wire,
        *,
        integrator_id: str,
        credentials: Mapping[str, BrandCredentials],
        on_rate: RateHook | None = None,
    ) -> None:
        self.wire = wire
        self.integrator_id = integrator_id
        self.credentials = credentials
        self.on_rate = on_rate

    def authenticate(self, brand: str) -> Token:
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
        outcome = self.wire.send("POST", "/v2/auth", json=body)
        if self.on_rate is not None:
            try:
                self.on_rate(outcome.rate, rejected=isinstance(outcome, RateLimitedError))
            except Exception as exc:  # the auth budget's learning never fails the call
                log.warning(kv("auth_rate_unrecorded", error=exc.__class__.__name__))
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
