"""The Clopos client over httpx.MockTransport: every error row, the 200+success:false quirk,
rate-limit headers, only updatable fields sent, 401 -> one re-auth, no token in any log."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from worker.clopos.auth import AuthCaller, Token
from worker.clopos.client import CloposClient
from worker.clopos.wire import Wire
from worker.errors import (
    AuthError,
    NotReadyError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from worker.logs import RedactingFilter, register_secret
from worker.settings import BrandCredentials

SECRET = "client-secret-do-not-log-42"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJicmFuZCI6Im9wZW5hcGl0ZXN0In0.c2lnbmF0dXJlLXRva2Vu"
RECEIPT = {
    "id": 7,
    "status": 2,
    "closed_at": "2026-11-27 10:00:00",
    "fiscal_id": None,
    "lock": False,
}
RATE = {"RateLimit-Limit": "300", "RateLimit-Remaining": "299", "RateLimit-Reset": "42"}


class StubTokens:
    def __init__(self) -> None:
        self.issued = 0
        self.invalidated: list[str] = []

    def get(self, brand: str) -> str:
        return f"{TOKEN}-{self.issued}"

    def invalidate(self, brand: str, token: str) -> None:
        self.invalidated.append(token)
        self.issued += 1


def envelope(data=None, **extra):
    body = {"success": True, "data": data if data is not None else RECEIPT, "message": "ok"}
    body.update(extra)
    return body


def make_client(handler, on_response=None) -> tuple[CloposClient, StubTokens, list[httpx.Request]]:
    client, tokens, _, seen = make_api(handler, on_response)
    return client, tokens, seen


def make_api(handler, on_response=None):
    """(client, stub tokens, auth caller, requests seen) over one mock transport."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    wire = Wire(
        "https://clopos.test/open-api/", http=httpx.Client(transport=httpx.MockTransport(record))
    )
    auth = AuthCaller(
        wire,
        integrator_id="integrator-1",
        credentials={"b1": BrandCredentials(client_id="cid", client_secret=SECRET)},
    )
    tokens = StubTokens()
    client = CloposClient(wire, tokens, on_response=on_response)
    return client, tokens, auth, seen


def respond(status, body=None, headers=None, content=None):
    def handler(request):
        if content is not None:
            return httpx.Response(status, content=content, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


@pytest.mark.parametrize(
    "status,body,error",
    [
        (400, {"success": False, "error": "validation_failed", "message": "bad"}, PermanentError),
        (
            404,
            {"success": False, "error": "not_found", "message": "Receipt not found"},
            NotReadyError,
        ),
        (500, {"success": False, "message": "gateway error"}, TransientError),
        (502, None, TransientError),
        (503, {"success": False}, TransientError),
        (504, {"success": False, "message": "upstream timeout"}, TransientError),
    ],
)
def test_error_table_rows(status, body, error):
    client, _, _ = make_client(respond(status, body))
    with pytest.raises(error) as caught:
        client.get_receipt("b1", 7)
    assert caught.value.http_status == status
    assert caught.value.call == "GET"


def test_404_carries_the_error_code_and_message():
    client, _, _ = make_client(
        respond(404, {"success": False, "error": "not_found", "message": "Receipt not found"})
    )
    with pytest.raises(NotReadyError) as caught:
        client.get_receipt("b1", 7)
    assert caught.value.error_code == "not_found"
    assert "Receipt not found" in str(caught.value)


def test_429_carries_ratelimit_reset():
    client, _, _ = make_client(
        respond(429, {"success": False}, {"RateLimit-Reset": "17", "Retry-After": "3"})
    )
    with pytest.raises(RateLimitedError) as caught:
        client.get_receipt("b1", 7)
    assert caught.value.retry_after == 17


def test_429_falls_back_to_retry_after():
    client, _, _ = make_client(respond(429, {"success": False}, {"Retry-After": "5"}))
    with pytest.raises(RateLimitedError) as caught:
        client.patch_receipt("b1", 7, {"lock": True})
    assert caught.value.retry_after == 5


def test_401_reauthenticates_once_and_the_retried_call_succeeds():
    calls = []

    def handler(request):
        calls.append(request.headers["x-token"])
        if len(calls) == 1:
            return httpx.Response(401, json={"success": False, "error": "token_expired"})
        return httpx.Response(200, json=envelope())

    client, tokens, _ = make_client(handler)
    response = client.get_receipt("b1", 7)
    assert response.data["data"]["id"] == 7
    assert tokens.invalidated == [calls[0]]
    assert calls[0] != calls[1]


@pytest.mark.parametrize(
    "status,body",
    [
        (403, {"success": False, "error": "forbidden", "message": "token revoked"}),
        (200, {"success": False, "error": "token_expired", "message": "expired"}),
        (200, {"success": False, "error": "authentication_failed"}),
    ],
)
def test_any_auth_answer_drops_the_token_and_retries_once_with_a_fresh_one(status, body):
    calls = []

    def handler(request):
        calls.append(request.headers["x-token"])
        if len(calls) == 1:
            return httpx.Response(status, json=body)
        return httpx.Response(200, json=envelope())

    client, tokens, _ = make_client(handler)
    assert client.get_receipt("b1", 7).data["data"]["id"] == 7
    assert tokens.invalidated == [calls[0]]  # exactly the token that was refused
    assert len(calls) == 2 and calls[0] != calls[1]


def test_401_twice_is_an_auth_error_after_exactly_one_reauth():
    client, tokens, seen = make_client(respond(401, {"success": False, "error": "invalid_token"}))
    with pytest.raises(AuthError):
        client.get_receipt("b1", 7)
    assert len(seen) == 2
    assert len(tokens.invalidated) == 1


@pytest.mark.parametrize(
    "code,error",
    [
        ("validation_failed", PermanentError),
        ("not_found", NotReadyError),
        ("authentication_failed", AuthError),
        ("token_expired", AuthError),
        ("invalid_token", AuthError),
        ("something_new", TransientError),
        (None, TransientError),
    ],
)
def test_200_with_success_false_is_a_failure_classified_by_error(code, error):
    body = {"success": False, "message": "nope"}
    if code:
        body["error"] = code
    client, _, _ = make_client(respond(200, body))
    with pytest.raises(error):
        client.get_receipt("b1", 7)


@pytest.mark.parametrize("content", [b"<html>gateway</html>", b"", b"[1, 2]", b'"ok"'])
def test_unparsable_or_non_object_body_is_transient(content):
    client, _, _ = make_client(respond(200, content=content))
    with pytest.raises(TransientError):
        client.get_receipt("b1", 7)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("slow"),
        httpx.ConnectTimeout("slow"),
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("reset"),
    ],
)
def test_network_failures_are_transient(exc):
    def handler(request):
        raise exc

    client, _, _ = make_client(handler)
    with pytest.raises(TransientError):
        client.patch_receipt("b1", 7, {"fiscal_id": "F", "lock": True})


def test_rate_limit_headers_are_surfaced_on_success_errors_and_the_hook():
    hooked = []
    client, _, _ = make_client(
        respond(200, envelope(), RATE), on_response=lambda *a: hooked.append(a)
    )
    response = client.get_receipt("b1", 7)
    assert (response.rate.limit, response.rate.remaining, response.rate.reset_seconds) == (
        300,
        299,
        42,
    )
    assert hooked == [("b1", "GET", 200, response.rate)]

    client, _, _ = make_client(respond(500, {"success": False}, RATE))
    with pytest.raises(TransientError) as caught:
        client.get_receipt("b1", 7)
    assert caught.value.rate.remaining == 299


def test_patch_sends_only_the_given_updatable_fields_with_token_and_venue():
    client, _, seen = make_client(respond(200, envelope()))
    client.patch_receipt("b1", 7, {"fiscal_id": "F1", "lock": True}, venue_id=3)
    request = seen[0]
    assert request.method == "PATCH"
    assert request.url.path == "/open-api/v2/receipts/7"
    assert json.loads(request.content) == {"fiscal_id": "F1", "lock": True}
    assert request.headers["x-venue"] == "3"
    assert request.headers["x-token"].startswith(TOKEN)


@pytest.mark.parametrize("fields", [{"fiscal_id": "F", "total": 0}, {"status": 2}, {}])
def test_patch_refuses_anything_but_updatable_fields(fields):
    client, _, seen = make_client(respond(200, envelope()))
    with pytest.raises(ValueError):
        client.patch_receipt("b1", 7, fields)
    assert seen == []


def test_get_without_venue_sends_no_x_venue():
    client, _, seen = make_client(respond(200, envelope()))
    client.get_receipt("b1", 7)
    assert "x-venue" not in seen[0].headers


def test_timeouts_are_explicit_and_above_the_upstream_limit():
    wire = Wire("https://x")
    assert wire.http.timeout.read is not None and wire.http.timeout.read > 8
    assert wire.http.timeout.connect is not None


def auth_handler(status, body):
    def handler(request):
        assert request.url.path.endswith("/v2/auth")
        return httpx.Response(status, json=body)

    return handler


def test_authenticate_returns_a_token_with_its_lifetime():
    _, _, auth, seen = make_api(
        auth_handler(
            200,
            {
                "success": True,
                "token": TOKEN,
                "token_type": "Bearer",
                "expires_in": 3600,
                "expires_at": 0,
                "message": "Authentication successful",
            },
        )
    )
    token = auth.authenticate("b1")
    assert token.value == TOKEN and token.lifetime == 3600
    sent = json.loads(seen[0].content)
    assert sent == {
        "client_id": "cid",
        "client_secret": SECRET,
        "brand": "b1",
        "integrator_id": "integrator-1",
    }
    assert TOKEN not in repr(token)


@pytest.mark.parametrize(
    "status,body",
    [
        (
            200,
            {
                "success": False,
                "error": "authentication_failed",
                "message": "test integrator, prod brand",
            },
        ),
        (401, {"success": False, "error": "authentication_failed", "message": "bad credentials"}),
        (400, {"success": False, "error": "validation_failed", "message": "missing fields"}),
    ],
)
def test_rejected_authentication_is_an_auth_error(status, body):
    _, _, auth, _ = make_api(auth_handler(status, body))
    with pytest.raises(AuthError) as caught:
        auth.authenticate("b1")
    assert caught.value.call == "auth"


def test_unknown_brand_cannot_authenticate_and_sends_nothing():
    _, _, auth, seen = make_api(auth_handler(200, {}))
    with pytest.raises(AuthError):
        auth.authenticate("nobody")
    assert seen == []


def test_no_token_or_secret_reaches_the_logs(caplog):
    def handler(request):
        if request.url.path.endswith("/v2/auth"):
            return httpx.Response(200, json={"success": True, "token": TOKEN, "expires_in": 3600})
        if request.method == "PATCH":
            return httpx.Response(401, json={"success": False, "error": "invalid_token"})
        return httpx.Response(200, json=envelope(), headers=RATE)

    _, _, auth, _ = make_api(handler)
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RedactingFilter())
    token = auth.authenticate("b1")
    tokens = type("T", (), {"get": lambda s, b: token.value, "invalidate": lambda s, b, t: None})
    client = CloposClient(auth.wire, tokens())
    client.get_receipt("b1", 7)
    with pytest.raises(AuthError):
        client.patch_receipt("b1", 7, {"lock": True})
    # Even a careless log call with the token is masked by the filter.
    logging.getLogger("careless").warning("token was %s", token.value)
    assert caplog.records
    assert TOKEN not in caplog.text
    assert SECRET not in caplog.text
    assert "***" in caplog.text


def test_register_secret_masks_in_exceptions_too(caplog):
    register_secret("super-secret-value-123")
    caplog.handler.addFilter(RedactingFilter())
    try:
        raise RuntimeError("boom super-secret-value-123")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    assert "super-secret-value-123" not in caplog.text


def test_token_expiry_uses_our_clock():
    token = Token("v", expires_at=1000.0, lifetime=3600.0)
    assert "v" not in repr(token).replace("expires_at", "")
