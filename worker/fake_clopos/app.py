"""The fake Clopos API on the wire: the Starlette app over a `CloposModel`.

Every route turns the request into a model call and the model's `Reply` into JSON; the
waits the model asks for (latency, slow_next) are awaited here, outside its lock. The
routes are listed in the package docstring.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from worker.fake_clopos.model import ERROR_IDS, CloposModel, Reply, error_body, parse_patch


class _BadControl(Exception):
    """A control request that cannot be carried out (answered with 400)."""


def build_app(model: CloposModel) -> Starlette:
    """The ASGI app serving `model`: the Open API v2 routes and the `/_fake/...` controls."""
    return Starlette(
        routes=_Routes(model).routes(),
        exception_handlers={404: _http_error, 405: _http_error},
    )


class _Routes:
    def __init__(self, model: CloposModel) -> None:
        self.model = model

    def routes(self) -> list[Route]:
        return [
            Route("/v2/auth", self._auth_endpoint, methods=["POST"]),
            Route("/v2/receipts/{receipt_id}", self._receipt_endpoint, methods=["GET", "PATCH"]),
            Route("/_fake/stats", self._ctl_stats, methods=["GET"]),
            Route("/_fake/reset-stats", self._ctl_reset_stats, methods=["POST"]),
            Route("/_fake/reset-faults", self._ctl_reset_faults, methods=["POST"]),
            Route("/_fake/brands", self._ctl_add_brand, methods=["POST"]),
            Route("/_fake/receipts", self._ctl_add_receipt, methods=["POST"]),
            Route("/_fake/receipts/{brand}/{receipt_id:int}", self._ctl_receipt, methods=["GET"]),
            Route("/_fake/faults", self._ctl_faults, methods=["POST"]),
        ]

    # --- POST /v2/auth -----------------------------------------------------------------

    async def _auth_endpoint(self, request: Request) -> JSONResponse:
        ip = _client_ip(request)
        body = _json_or_none(await request.body())
        delay = self.model.auth_delay(body)
        if delay > 0:
            await asyncio.sleep(delay)
        return _respond(self.model.authenticate(ip, body))

    # --- GET / PATCH /v2/receipts/{id} -------------------------------------------------

    async def _receipt_endpoint(self, request: Request) -> JSONResponse:
        method = "PATCH" if request.method == "PATCH" else "GET"
        receipt_id = _parse_receipt_id(request.path_params["receipt_id"])
        token = request.headers.get("x-token")
        patch = parse_patch(await request.body()) if method == "PATCH" else None
        call = self.model.open_receipt_call(method, token, receipt_id)
        try:
            if call.delay > 0:
                await asyncio.sleep(call.delay)
            reply = self.model.serve_receipt(
                _client_ip(request),
                method,
                token,
                receipt_id,
                request.headers.get("x-venue"),
                patch,
            )
        finally:
            self.model.close_receipt_call(call)
        return _respond(reply)

    # --- control endpoints -------------------------------------------------------------

    async def _ctl_stats(self, request: Request) -> JSONResponse:
        return JSONResponse(self.model.stats())

    async def _ctl_reset_stats(self, request: Request) -> JSONResponse:
        self.model.reset_stats()
        return _control_ok(None)

    async def _ctl_reset_faults(self, request: Request) -> JSONResponse:
        self.model.reset_faults()
        return _control_ok(None)

    async def _ctl_add_brand(self, request: Request) -> JSONResponse:
        body = _json_or_none(await request.body())
        return _run_control(lambda: self.model.add_brand(**_object(body)))

    async def _ctl_add_receipt(self, request: Request) -> JSONResponse:
        raw = _json_or_none(await request.body())

        def add() -> dict[str, Any]:
            body = _object(raw)
            return self.model.add_receipt(body.get("brand"), _object(body.get("receipt")))

        return _run_control(add)

    async def _ctl_receipt(self, request: Request) -> JSONResponse:
        stored = self.model.receipt(request.path_params["brand"], request.path_params["receipt_id"])
        if stored is None:
            return JSONResponse(error_body("not_found", "Receipt not found"), status_code=404)
        return _control_ok(stored)

    async def _ctl_faults(self, request: Request) -> JSONResponse:
        body = _json_or_none(await request.body())
        kwargs = dict(body) if isinstance(body, dict) else {}
        kind = kwargs.pop("kind", None)
        action = self.model.fault_actions().get(kind) if isinstance(kind, str) else None
        if action is None:
            return JSONResponse(error_body("bad_request", f"unknown fault kind {kind!r}"), 400)
        return _run_control(lambda: action(**kwargs))


# --- helpers -------------------------------------------------------------------------


def _parse_receipt_id(raw: str) -> int | None:
    return int(raw) if raw.isascii() and raw.isdigit() else None


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadControl("expected a JSON object")
    return value


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _respond(reply: Reply) -> JSONResponse:
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _control_ok(data: Any) -> JSONResponse:
    return JSONResponse({"success": True, "data": data})


def _run_control(action: Callable[[], Any]) -> JSONResponse:
    try:
        return _control_ok(action())
    except (_BadControl, TypeError, ValueError, KeyError) as exc:
        return JSONResponse(error_body("bad_request", str(exc)), status_code=400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = "Not found" if status == 404 else "Method not allowed"
    return JSONResponse(error_body(ERROR_IDS.get(status, "error"), message), status_code=status)
