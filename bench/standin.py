"""A fast stand-in for the Clopos API, for the benchmarks: its own process, asyncio, no framework.

    python -m bench.standin --port 0 [--latency S] [--rate-limit N --rate-window S]
                            [--auth-limit N]

Prints `standin ready http://127.0.0.1:<port>` once it accepts connections. It answers only
what the worker and the bare Celery baseline send, as cheaply as correct HTTP/1.1 keep-alive
allows (Content-Length bodies, JSON), so that the API is not what a benchmark measures:

    POST  /v2/auth              {client_id, client_secret, brand, integrator_id} (non-empty
                                strings) -> a token for the brand; RateLimit-* headers of
                                the per-IP auth window; over --auth-limit: 429
    GET   /v2/receipts/{id}     x-token names the brand (x-venue is accepted, ignored);
                                every id >= 1 exists and is closed: status 2, closed_at,
                                fiscal_id (what a PATCH stored, else null), lock
    PATCH /v2/receipts/{id}     {"fiscal_id": str, "lock": bool} (either or both) -> stored,
                                the updated receipt answered
    GET   /_stats               patches {"brand:id": n}, patch_times {"brand:id": last unix
                                time}, receipts {"brand:id": [fiscal_id, lock]},
                                request_log [[t, method, brand, receipt_id, status], ...],
                                rate_limited, auth_calls
    GET   /_progress            the cheap poll: {"patched": receipts with >= 1 PATCH,
                                "patches", "requests", "last_patch"}
    POST  /_reset               forget every receipt, token count and statistic

Every receipt answer carries RateLimit-Limit/Remaining/Reset of the brand's window. With
--rate-limit N the window holds N calls per --rate-window seconds and a call over it gets
429 with Retry-After (as Clopos); without it nothing is refused and the headers advertise
UNLIMITED calls per window. That is deliberate: the worker learns other clients' use of its
budget from RateLimit-Remaining (worker/ratelimit.py), so advertising Clopos' 300 to a
worker configured far above it would make the worker throttle itself to 300.

--latency S delays every receipt answer by S seconds (asyncio timers, nothing blocks); the
receipt changes when its answer is sent, as the fake's does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from collections import defaultdict, deque
from typing import Any
from urllib.parse import urlsplit

UNLIMITED = 1_000_000  # calls per window advertised when no --rate-limit is enforced
AUTH_FIELDS = ("client_id", "client_secret", "brand", "integrator_id")
PATCH_FIELDS = {"fiscal_id": str, "lock": bool}
CLOSED_AT = "2026-11-27 12:00:00"
MAX_HEAD_BYTES = 64 * 1024
CONTROL_ROUTES = {"/v2/auth": "POST", "/_progress": "GET", "/_stats": "GET", "/_reset": "POST"}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
}

Headers = dict[str, str]
Answer = tuple[int, Any, Headers]


class Window:
    """A sliding window of call times (monotonic): the per-brand budget, the auth limit."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self.calls: deque[float] = deque()

    def take(self, now: float, enforce: bool) -> tuple[bool, Headers]:
        """Count a call at `now` unless the window is full and `enforce`; (taken, headers)."""
        calls = self.calls
        while calls and calls[0] <= now - self.seconds:
            calls.popleft()
        taken = not enforce or len(calls) < self.limit
        if taken:
            calls.append(now)
        if len(calls) >= self.limit:
            reset = max(1, math.ceil(calls[len(calls) - self.limit] + self.seconds - now))
        else:
            reset = math.ceil(calls[0] + self.seconds - now) if calls else 0
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.limit - len(calls))),
            "RateLimit-Reset": str(reset),
        }
        if not taken:
            headers["Retry-After"] = str(reset)
        return taken, headers


class StandinApi:
    """The routes and the state behind them; every answer is (status, JSON body, headers)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rate_limit: int | None = None,
        rate_window: float = 60.0,
        auth_limit: int = 60,
        auth_window: float = 60.0,
    ) -> None:
        self.latency = latency
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.auth_limit = auth_limit
        self.auth_window = auth_window
        self.reset()

    def reset(self) -> None:
        self.tokens: dict[str, str] = {}  # token -> brand
        self.receipts: dict[str, list[Any]] = {}  # "brand:id" -> [fiscal_id, lock]
        self.patches: dict[str, int] = defaultdict(int)
        self.patch_times: dict[str, float] = {}
        self.request_log: list[list[Any]] = []
        self.rate_limited: dict[str, int] = defaultdict(int)
        self.auth_calls: dict[str, int] = defaultdict(int)
        self.budgets: dict[str, Window] = {}
        self.auth_windows: dict[str, Window] = {}

    # --- routing ---------------------------------------------------------------------

    def delay(self, method: str, path: str) -> float:
        """How long to hold this request's answer: --latency for a receipt call."""
        return self.latency if path.startswith("/v2/receipts/") else 0.0

    def answer(self, method: str, path: str, headers: Headers, body: bytes, ip: str) -> Answer:
        if path.startswith("/v2/receipts/"):
            if method not in ("GET", "PATCH"):
                return _error(405, "method_not_allowed")
            return self.receipt(method, path[len("/v2/receipts/") :], headers, body)
        expected = CONTROL_ROUTES.get(path)
        if expected is None:
            return _error(404, "not_found")
        if method != expected:
            return _error(405, "method_not_allowed")
        if path == "/v2/auth":
            return self.auth(body, ip)
        if path == "/_progress":
            return 200, self.progress(), {}
        if path == "/_stats":
            return 200, self.stats(), {}
        self.reset()
        return 200, {"success": True}, {}

    # --- POST /v2/auth -----------------------------------------------------------------

    def auth(self, raw: bytes, ip: str) -> Answer:
        window = self.auth_windows.get(ip)
        if window is None:
            window = self.auth_windows[ip] = Window(self.auth_limit, self.auth_window)
        taken, headers = window.take(time.monotonic(), enforce=True)
        body = _json(raw)
        brand = body.get("brand") if isinstance(body, dict) else None
        brand = brand if isinstance(brand, str) else None
        if brand is not None:
            self.auth_calls[brand] += 1
        if not taken:
            self.rate_limited["_auth"] += 1
            status, reply = 429, _error_body("rate_limited")
        elif brand and all(isinstance(body.get(f), str) and body[f] for f in AUTH_FIELDS):
            token = f"standin.{secrets.token_hex(16)}"
            self.tokens[token] = brand
            status = 200
            reply = {"success": True, "token": token, "token_type": "Bearer", "expires_in": 3600}
        else:
            status, reply = 400, _error_body("validation_failed")
        self.request_log.append([time.time(), "POST", brand, None, status])
        return status, reply, headers

    # --- GET / PATCH /v2/receipts/{id} -------------------------------------------------

    def receipt(self, method: str, raw_id: str, headers: Headers, body: bytes) -> Answer:
        brand = self.tokens.get(headers.get("x-token", ""))
        receipt_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() else 0
        status, reply, extra = self._receipt(method, brand, receipt_id, body)
        self.request_log.append([time.time(), method, brand, receipt_id or raw_id, status])
        return status, reply, extra

    def _receipt(self, method: str, brand: str | None, receipt_id: int, body: bytes) -> Answer:
        if brand is None:
            return _error(401, "invalid_token")
        budget = self.budgets.get(brand)
        if budget is None:
            limit = self.rate_limit or UNLIMITED
            budget = self.budgets[brand] = Window(limit, self.rate_window)
        taken, headers = budget.take(time.monotonic(), enforce=self.rate_limit is not None)
        if not taken:
            self.rate_limited[brand] += 1
            return 429, _error_body("rate_limited"), headers
        if receipt_id < 1:
            return 404, _error_body("not_found"), headers
        key = f"{brand}:{receipt_id}"
        state = self.receipts.get(key) or [None, False]
        if method == "PATCH":
            update = _json(body)
            if not _valid_patch(update):
                return 400, _error_body("validation_failed"), headers
            state = [update.get("fiscal_id", state[0]), update.get("lock", state[1])]
            self.receipts[key] = state
            self.patches[key] += 1
            self.patch_times[key] = time.time()
        data = {
            "id": receipt_id,
            "venue_id": 1,
            "status": 2,
            "closed_at": CLOSED_AT,
            "fiscal_id": state[0],
            "lock": state[1],
        }
        return 200, {"success": True, "data": data}, headers

    # --- control -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "patches": dict(self.patches),
            "patch_times": self.patch_times,
            "receipts": self.receipts,
            "request_log": self.request_log,
            "rate_limited": dict(self.rate_limited),
            "auth_calls": dict(self.auth_calls),
        }

    def progress(self) -> dict[str, Any]:
        return {
            "patched": len(self.patches),
            "patches": sum(self.patches.values()),
            "requests": len(self.request_log),
            "last_patch": max(self.patch_times.values(), default=None),
        }


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _valid_patch(update: Any) -> bool:
    if not isinstance(update, dict) or not update or not set(update) <= PATCH_FIELDS.keys():
        return False
    return all(type(value) is PATCH_FIELDS[name] for name, value in update.items()) and (
        update.get("fiscal_id") != ""
    )


def _error_body(error: str) -> dict[str, Any]:
    return {"success": False, "error": error, "message": error.replace("_", " ")}


def _error(status: int, error: str) -> Answer:
    return status, _error_body(error), {}


def _encode(status: int, body: Any, headers: Headers, close: bool) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
    ]
    head += [f"{name}: {value}" for name, value in headers.items()]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


class Connection(asyncio.Protocol):
    """One keep-alive connection: requests parsed from a buffer, answers written in order
    (an answer held by --latency keeps its place in the outbox)."""

    def __init__(self, api: StandinApi) -> None:
        self.api = api
        self.buffer = bytearray()
        self.outbox: deque[list[bytes | None]] = deque()
        self.transport: asyncio.Transport | None = None
        self.ip = "unknown"
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else "unknown"

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.closing and self._next_request():
            pass

    def _next_request(self) -> bool:
        """Parse and dispatch one complete request from the buffer; False if none is."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._reply_now(400, _error_body("bad_request"), close=True)
            return False
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers: Headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or "chunked" in headers.get("transfer-encoding", ""):
            self._reply_now(411 if len(parts) == 3 else 400, _error_body("bad_request"), True)
            return False
        length_text = headers.get("content-length", "0") or "0"
        if not length_text.isdigit():
            self._reply_now(400, _error_body("bad_request"), close=True)
            return False
        length = int(length_text)
        if len(self.buffer) < end + 4 + length:
            return False
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        method, path = parts[0], urlsplit(parts[1]).path
        close = headers.get("connection", "").lower() == "close" or parts[2] == "HTTP/1.0"
        slot: list[bytes | None] = [None]
        self.outbox.append(slot)
        delay = self.api.delay(method, path)
        if delay > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(delay, self._serve, slot, method, path, headers, body, close)
        else:
            self._serve(slot, method, path, headers, body, close)
        self.closing = close
        return True

    def _serve(
        self,
        slot: list[bytes | None],
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        close: bool,
    ) -> None:
        try:
            status, reply, extra = self.api.answer(method, path, headers, body, self.ip)
        except Exception as exc:  # a bug here must show as a failed call, not a hung one
            status, reply, extra = 500, _error_body(f"standin_{exc.__class__.__name__}"), {}
        slot[0] = _encode(status, reply, extra, close)
        self._flush()

    def _reply_now(self, status: int, body: Any, close: bool) -> None:
        self.buffer.clear()
        self.closing = close
        self.outbox.append([_encode(status, body, {}, close)])
        self._flush()

    def _flush(self) -> None:
        while self.outbox and self.outbox[0][0] is not None:
            data = self.outbox.popleft()[0]
            if self.transport is None:
                continue
            self.transport.write(data)  # type: ignore[arg-type]
        if self.closing and not self.outbox and self.transport is not None:
            self.transport.close()


async def serve(api: StandinApi, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(api), "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"standin ready http://127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per receipt call")
    parser.add_argument("--rate-limit", type=int, default=None, help="enforced calls per window")
    parser.add_argument("--rate-window", type=float, default=60.0, help="seconds")
    parser.add_argument("--auth-limit", type=int, default=60, help="auth calls per IP per 60 s")
    args = parser.parse_args(argv)
    api = StandinApi(
        latency=args.latency,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        auth_limit=args.auth_limit,
    )
    try:
        asyncio.run(serve(api, args.port))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
