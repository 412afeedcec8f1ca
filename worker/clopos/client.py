"""GET and PATCH one receipt with the brand's shared token, every failure typed.

An auth-class answer to a call (401, 403, success:false with a token error) invalidates the
shared token and the call is retried once with a fresh one. The caller governs each request
through a `CallGate` it hands in (budget, breaker, fence); the client never calls back into
anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from worker.clopos.wire import ApiResponse, Wire
from worker.errors import AuthError, CloposError, RateLimitInfo
from worker.logs import kv

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = frozenset({"fiscal_id", "lock", "order_status", "order_number"})


class TokenSource(Protocol):
    """What the client needs from a token provider (worker.clopos.tokens.TokenProvider)."""

    def get(self, brand: str) -> str: ...

    def has(self, brand: str) -> bool: ...  # a fresh token in this process: get() is free

    def invalidate(self, brand: str, token: str) -> None: ...


class CallGate(Protocol):
    """What a caller hands the client to govern one call's requests (the pipeline's run):
    `before_call` before the token is fetched (budget, and the breaker when the token may
    cost a /v2/auth: it may raise Deferred, so a brand that may not call costs no auth
    call); `before_send` right before the request goes (the fence, breaker, pause and
    window guard in one step: it may raise to stop it)."""

    def before_call(self) -> None: ...

    def before_send(self) -> None: ...


# Called after every authenticated response (rate budget, metrics); must not raise.
ResponseHook = Callable[[str, str, int | None, RateLimitInfo], None]


class CloposClient:
    """The two receipt calls the worker makes, each with at most one re-authentication."""

    def __init__(
        self, wire: Wire, tokens: TokenSource, *, on_response: ResponseHook | None = None
    ) -> None:
        self.wire = wire
        self.tokens = tokens
        self.on_response = on_response

    def close(self) -> None:
        self.wire.close()

    # --- the two calls -----------------------------------------------------------------
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
            outcome = self.wire.send(method, path, json=body, headers=headers)
            status = outcome.http_status if isinstance(outcome, CloposError) else outcome.status
            if self.on_response is not None:
                self.on_response(brand, method, status, outcome.rate)
            # Every call is in the receipt's audit trail; a failed one is logged at INFO,
            # an answered one at DEBUG (the result's own line says it was fiscalised).
            failed = isinstance(outcome, CloposError)
            level = logging.INFO if failed else logging.DEBUG
            if log.isEnabledFor(level):  # kv() is not built for a line nobody logs
                log.log(
                    level,
                    kv(
                        "clopos_call",
                        brand=brand,
                        receipt_id=receipt_id,
                        method=method,
                        status=status,
                        outcome=outcome.kind if failed else "ok",
                    ),
                )
            if isinstance(outcome, AuthError) and attempt == 1:
                self.tokens.invalidate(brand, token)  # expired or revoked: one fresh token
                continue
            if isinstance(outcome, CloposError):
                outcome.call = method
                raise outcome
            return outcome
        raise AssertionError("unreachable")
