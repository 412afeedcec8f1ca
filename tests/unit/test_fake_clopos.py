"""The fake Clopos API over real HTTP: auth, receipts, limits, faults, stats, control, seed."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from support import wait_for

from worker.fake_clopos import FakeClopos, default_seed

BRANDS = {
    "cafe": {"client_id": "cafe-id", "client_secret": "cafe-secret", "default_venue_id": 1},
    "bistro": {"client_id": "bistro-id", "client_secret": "bistro-secret"},
    "live": {"client_id": "live-id", "client_secret": "live-secret", "production": True},
}
TIME_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
RECEIPT_FIELDS = {
    "id",
    "status",
    "closed_at",
    "fiscal_id",
    "lock",
    "order_status",
    "order_number",
    "updated_at",
    "created_at",
    "venue_id",
    "cid",
    "total",
    "products",
    "payment_methods",
    "service_charge",
    "discount",
}

MakeFake = Callable[..., tuple[FakeClopos, httpx.Client]]


@pytest.fixture
def make_fake() -> Iterator[MakeFake]:
    running: list[tuple[FakeClopos, httpx.Client]] = []

    def make(**kwargs: Any) -> tuple[FakeClopos, httpx.Client]:
        kwargs.setdefault("brands", json.loads(json.dumps(BRANDS)))
        fake = FakeClopos(**kwargs)
        client = httpx.Client(base_url=fake.start(), timeout=10)
        running.append((fake, client))
        for rid in range(1, 6) if "cafe" in fake.brands() else ():
            fake.add_receipt("cafe", {"id": rid})
        return fake, client

    yield make
    for fake, client in running:
        client.close()
        fake.stop()


@pytest.fixture
def api(make_fake: MakeFake) -> tuple[FakeClopos, httpx.Client]:
    return make_fake()


@pytest.fixture(scope="module")
def shared_api() -> Iterator[tuple[FakeClopos, httpx.Client]]:
    """One server for the many parametrized cases that change no state (a faster suite)."""
    fake = FakeClopos(brands=json.loads(json.dumps(BRANDS)), auth_limit=1000)
    fake.add_receipt("cafe", {"id": 1})
    with httpx.Client(base_url=fake.start(), timeout=10) as client:
        yield fake, client
    fake.stop()


def auth(client: httpx.Client, brand: str = "cafe", **overrides: Any) -> httpx.Response:
    creds = BRANDS.get(brand, BRANDS["cafe"])
    body = {
        "client_id": creds["client_id"],
        "client_secret": creds["client_secret"],
        "brand": brand,
        "integrator_id": "fake-integrator",
    }
    return client.post("/v2/auth", json=body | overrides)


def token(client: httpx.Client, brand: str = "cafe") -> str:
    response = auth(client, brand)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def get(client: httpx.Client, tok: str, rid: int | str, **headers: str) -> httpx.Response:
    return client.get(f"/v2/receipts/{rid}", headers={"x-token": tok, **headers})


def patch(client: httpx.Client, tok: str, rid: int, body: Any = None, **kw: Any) -> httpx.Response:
    return client.patch(f"/v2/receipts/{rid}", headers={"x-token": tok}, json=body, **kw)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    wait_for(condition, timeout=timeout, interval=0.02)


def error_of(response: httpx.Response) -> str | None:
    return response.json().get("error")


# --- auth ----------------------------------------------------------------------------


def test_auth_success_envelope_and_token_works(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    before = time.time()
    response = auth(client)
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert before + 3598 <= body["expires_at"] <= time.time() + 3600
    assert body["message"] == "Authentication successful"
    parts = body["token"].split(".")
    assert len(parts) == 3
    payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    assert payload["brand"] == "cafe"
    assert payload["venue_id"] == 1
    assert payload["exp"] == body["expires_at"]
    assert get(client, body["token"], 1).status_code == 200


@pytest.mark.parametrize(
    "overrides",
    [{"client_secret": "wrong"}, {"client_id": "wrong"}, {"brand": "nobody"}],
    ids=["secret", "client_id", "brand"],
)
def test_auth_bad_credentials_401(
    shared_api: tuple[FakeClopos, httpx.Client], overrides: dict[str, str]
) -> None:
    _, client = shared_api
    response = auth(client, **overrides)
    assert response.status_code == 401
    assert response.json()["success"] is False
    assert error_of(response) == "authentication_failed"


def test_auth_bad_request_400(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    missing = {"client_id": "cafe-id", "client_secret": "cafe-secret", "brand": "cafe"}
    assert client.post("/v2/auth", json=missing).status_code == 400
    assert error_of(client.post("/v2/auth", json=missing)) == "validation_failed"
    assert auth(client, client_id=5).status_code == 400
    assert auth(client, integrator_id="someone-else").status_code == 400
    assert client.post("/v2/auth", content=b"{nope").status_code == 400


def test_production_brand_in_test_mode_is_200_with_success_false(
    api: tuple[FakeClopos, httpx.Client],
) -> None:
    fake, client = api
    response = auth(client, "live")
    assert response.status_code == 200
    assert response.json()["success"] is False
    assert error_of(response) == "authentication_failed"
    assert "token" not in response.json()
    assert fake.stats()["auth_rejected"] == {"live": 1}


def test_auth_limit_per_ip_answers_429(make_fake: MakeFake) -> None:
    fake, client = make_fake(auth_limit=3, auth_window=60)
    assert [auth(client).status_code for _ in range(3)] == [200, 200, 200]
    limited = auth(client)
    assert limited.status_code == 429
    assert error_of(limited) == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    stats = fake.stats()
    assert stats["rate_limited"]["_auth"] == 1
    assert stats["auth_calls"]["cafe"] == 4
    assert "cafe" not in stats["requests"]  # auth does not spend the brand budget


# --- GET -----------------------------------------------------------------------------


def test_get_envelope(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    response = get(client, token(client), 2)
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True
    assert isinstance(body["message"], str)
    assert TIME_PATTERN.match(body["time"])
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    assert isinstance(body["unix"], int)
    assert abs(body["unix"] - time.time()) < 5
    receipt = body["data"]
    assert receipt.keys() >= RECEIPT_FIELDS
    assert receipt["id"] == 2
    assert receipt["status"] == 2
    assert TIME_PATTERN.match(receipt["closed_at"])
    assert receipt["fiscal_id"] is None
    assert receipt["lock"] is False
    assert isinstance(receipt["total"], int)
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
        assert name in response.headers


def test_unknown_and_non_integer_receipt_404(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    tok = token(client)
    for rid in (999, "abc", 0):
        response = get(client, tok, rid)
        assert response.status_code == 404
        assert response.json() == {
            "success": False,
            "error": "not_found",
            "message": "Receipt not found",
        }
        assert "RateLimit-Remaining" in response.headers


def test_missing_and_unknown_token_401(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    missing = client.get("/v2/receipts/1")
    assert missing.status_code == 401
    assert error_of(missing) == "invalid_token"
    assert error_of(get(client, "a.b.c", 1)) == "invalid_token"
    assert "RateLimit-Limit" in missing.headers


def test_x_venue_scopes_receipts(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    fake.add_receipt("cafe", {"id": 50, "venue_id": 2})
    tok = token(client)
    assert get(client, tok, 50).status_code == 404
    assert get(client, tok, 50, **{"x-venue": "2"}).json()["data"]["venue_id"] == 2
    assert get(client, tok, 1, **{"x-venue": "2"}).status_code == 404
    assert get(client, tok, 1).status_code == 200
    assert get(client, tok, 1, **{"x-venue": "two"}).status_code == 400


# --- PATCH ---------------------------------------------------------------------------


def test_patch_updates_and_returns_the_full_receipt(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    before = fake.receipt("cafe", 3)
    assert before is not None
    response = patch(client, tok, 3, {"fiscal_id": "FIS-1", "lock": True})
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True
    assert body["message"] == "Operation completed successfully"
    data = body["data"]
    assert data["fiscal_id"] == "FIS-1"
    assert data["lock"] is True
    assert data["status"] == 2  # closed receipts accept the update
    for name in ("total", "closed_at", "cid", "products", "order_status"):
        assert data[name] == before[name]
    assert TIME_PATTERN.match(data["updated_at"])
    assert fake.receipt("cafe", 3) == data
    partial = patch(client, tok, 3, {"order_status": "READY", "order_number": "A-7"}).json()
    assert partial["data"]["fiscal_id"] == "FIS-1"
    assert partial["data"]["order_status"] == "READY"
    assert partial["data"]["order_number"] == "A-7"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"color": "red"}},
        {"json": {"fiscal_id": "F", "extra": 1}},
        {"json": {"lock": 1}},
        {"json": {"lock": "true"}},
        {"json": {"fiscal_id": 5}},
        {"json": {"fiscal_id": ""}},
        {"json": {"fiscal_id": None}},
        {"json": {"order_status": "DONE"}},
        {"json": {"order_number": 12}},
        {"json": {}},
        {"json": [{"fiscal_id": "F"}]},
        {"json": "fiscal_id"},
        {"content": b"{not json"},
        {"content": b""},
    ],
    ids=[
        "unknown",
        "extra",
        "lock-int",
        "lock-str",
        "fiscal-int",
        "fiscal-empty",
        "fiscal-null",
        "status-enum",
        "number-int",
        "empty",
        "list",
        "string",
        "invalid-json",
        "no-body",
    ],
)
def test_patch_validation_400(shared_api: tuple[FakeClopos, httpx.Client], kwargs: dict) -> None:
    fake, client = shared_api
    before = fake.receipt("cafe", 1)
    response = client.patch("/v2/receipts/1", headers={"x-token": token(client)}, **kwargs)
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": "validation_failed",
        "message": "Invalid field values provided",
    }
    assert fake.receipt("cafe", 1) == before


def test_patch_unknown_receipt_404(api: tuple[FakeClopos, httpx.Client]) -> None:
    _, client = api
    response = patch(client, token(client), 777, {"fiscal_id": "F"})
    assert response.status_code == 404
    assert error_of(response) == "not_found"


def test_overwrite_is_allowed_but_every_patch_body_is_recorded(
    api: tuple[FakeClopos, httpx.Client],
) -> None:
    fake, client = api
    tok = token(client)
    assert patch(client, tok, 1, {"fiscal_id": "A"}).status_code == 200
    assert patch(client, tok, 1, {"fiscal_id": "B", "lock": True}).status_code == 200
    assert patch(client, tok, 1, {"lock": 1}).status_code == 400
    assert fake.receipt("cafe", 1)["fiscal_id"] == "B"
    entry = fake.stats()["receipts"]["cafe:1"]
    assert entry["patch"] == 3
    assert entry["patch_bodies"] == [
        {"fiscal_id": "A"},
        {"fiscal_id": "B", "lock": True},
        {"lock": 1},
    ]


# --- rate limits ---------------------------------------------------------------------


def test_budget_sliding_window(make_fake: MakeFake) -> None:
    fake, client = make_fake(rate_limit=5, rate_window=2.0)
    tok = token(client)
    remaining = []
    for _ in range(5):
        response = get(client, tok, 1)
        assert response.status_code == 200
        assert response.headers["RateLimit-Limit"] == "5"
        remaining.append(int(response.headers["RateLimit-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    limited = get(client, tok, 1)
    assert limited.status_code == 429
    assert error_of(limited) == "rate_limited"
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(limited.headers["RateLimit-Reset"]) <= 2
    assert limited.headers["Retry-After"] == limited.headers["RateLimit-Reset"]
    wait_until(lambda: get(client, tok, 1).status_code == 200, timeout=5)
    stats = fake.stats()
    assert stats["rate_limited"]["cafe"] >= 1
    assert stats["requests"]["cafe"] == 7 + stats["rate_limited"]["cafe"] - 1


def test_budget_is_per_brand_and_shared_by_tokens(make_fake: MakeFake) -> None:
    _, client = make_fake(rate_limit=2, rate_window=60.0)
    first, second = token(client), token(client)
    assert get(client, first, 1).status_code == 200
    assert get(client, second, 1).status_code == 200
    assert get(client, first, 1).status_code == 429
    assert get(client, token(client, "bistro"), 1).status_code == 404  # its own budget


def test_external_usage_lowers_remaining_and_enforces(make_fake: MakeFake) -> None:
    fake, client = make_fake(rate_limit=5, rate_window=60.0)
    tok = token(client)
    fake.set_external_usage("cafe", 3)
    first = get(client, tok, 1)
    assert first.headers["RateLimit-Limit"] == "5"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert get(client, tok, 1).headers["RateLimit-Remaining"] == "0"
    assert get(client, tok, 1).status_code == 429
    fake.set_external_usage("cafe", 0)
    assert get(client, tok, 1).headers["RateLimit-Remaining"] == "2"


def test_flood_guard_blocks_an_ip_with_too_many_failures(make_fake: MakeFake) -> None:
    fake, client = make_fake(flood_limit=3, flood_window=1.0)
    tok = token(client)
    assert [get(client, tok, 999).status_code for _ in range(3)] == [404, 404, 404]
    blocked = get(client, tok, 1)
    assert blocked.status_code == 429
    assert error_of(blocked) == "rate_limited"
    assert blocked.headers["RateLimit-Limit"] == "3"
    assert int(blocked.headers["Retry-After"]) >= 1
    assert fake.stats()["rate_limited"]["_flood"] >= 1
    wait_until(lambda: get(client, tok, 1).status_code == 200, timeout=5)


# --- tokens --------------------------------------------------------------------------


def test_token_expires(make_fake: MakeFake) -> None:
    _, client = make_fake(token_lifetime=1.0)
    response = auth(client)
    assert response.json()["expires_in"] == 1
    tok = response.json()["token"]
    assert get(client, tok, 1).status_code == 200
    wait_until(lambda: get(client, tok, 1).status_code == 401, timeout=5)
    assert error_of(get(client, tok, 1)) == "token_expired"
    assert get(client, token(client), 1).status_code == 200


def test_revoke_tokens(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok, other = token(client), token(client, "bistro")
    fake.revoke_tokens("cafe")
    revoked = get(client, tok, 1)
    assert revoked.status_code == 401
    assert error_of(revoked) == "invalid_token"
    assert get(client, other, 1).status_code == 404  # other brands keep their tokens
    assert get(client, token(client), 1).status_code == 200


def test_revoke_tokens_with_a_non_401_answer(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    first = token(client)
    fake.revoke_tokens("cafe", status=403)
    forbidden = get(client, first, 1)
    assert (forbidden.status_code, error_of(forbidden)) == (403, "forbidden")
    second = token(client)
    assert get(client, second, 1).status_code == 200  # a new token is not revoked
    fake.revoke_tokens("cafe", status=200)
    expired = patch(client, second, 1, {"fiscal_id": "F"})
    assert expired.status_code == 200
    assert expired.json() == {
        "success": False,
        "error": "token_expired",
        "message": "Token has been revoked",
    }
    assert fake.receipt("cafe", 1)["fiscal_id"] is None  # nothing applied
    assert fake.stats()["receipts"]["cafe:1"]["patch"] == 0  # rejected before the receipt
    fake.revoke_tokens("cafe", status=403, error="token_revoked")
    assert error_of(get(client, second, 1)) == "token_revoked"
    with pytest.raises(ValueError):
        fake.revoke_tokens("cafe", status=1000)
    response = client.post(
        "/_fake/faults", json={"kind": "revoke_tokens", "brand": "bistro", "status": 403}
    )
    assert response.status_code == 200


def test_issued_tokens_lists_every_token(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    cafe, bistro = token(client), token(client, "bistro")
    assert fake.issued_tokens() == [cafe, bistro]
    assert fake.issued_tokens("bistro") == [bistro]


# --- faults --------------------------------------------------------------------------


def test_fail_next_with_count_and_method(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_next("cafe", 1, 500, count=2, method="PATCH")
    assert get(client, tok, 1).status_code == 200
    first = patch(client, tok, 1, {"fiscal_id": "F"})
    assert first.status_code == 500
    assert first.json()["success"] is False
    assert isinstance(first.json()["message"], str)
    assert patch(client, tok, 1, {"fiscal_id": "F"}).status_code == 500
    assert patch(client, tok, 1, {"fiscal_id": "F"}).status_code == 200
    fake.fail_next("cafe", 2, 504, body={"success": False, "message": "upstream"})
    custom = get(client, tok, 2)
    assert (custom.status_code, custom.json()) == (504, {"success": False, "message": "upstream"})
    assert get(client, tok, 2).status_code == 200


def test_injected_429_says_retry_in_one_second(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_next("cafe", 1, 429, method="GET")
    limited = get(client, tok, 1)
    assert limited.status_code == 429
    assert error_of(limited) == "rate_limited"
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["RateLimit-Reset"] == "1"
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert get(client, tok, 1).status_code == 200


def test_success_false(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.success_false("cafe", 1, "something_odd")
    response = patch(client, tok, 1, {"fiscal_id": "F"})
    assert response.status_code == 200
    assert response.json()["success"] is False
    assert error_of(response) == "something_odd"
    assert fake.receipt("cafe", 1)["fiscal_id"] is None
    fake.success_false("cafe", 1, None)
    assert "error" not in get(client, tok, 1).json()
    assert get(client, tok, 1).json()["success"] is True


def test_latency_per_receipt(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.set_latency(0.3, "cafe", 1)
    started = time.monotonic()
    assert get(client, tok, 1).status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert get(client, tok, 2).status_code == 200
    assert time.monotonic() - started < 0.3


def test_slow_next_delays_the_next_calls_once_and_still_applies_them(
    api: tuple[FakeClopos, httpx.Client],
) -> None:
    fake, client = api
    tok = token(client)
    fake.slow_next("cafe", 1, 0.5, method="PATCH")
    started = time.monotonic()
    assert get(client, tok, 1).status_code == 200  # a GET is not delayed
    assert time.monotonic() - started < 0.4
    with pytest.raises(httpx.ReadTimeout):
        patch(client, tok, 1, {"fiscal_id": "F"}, timeout=0.1)  # the client gives up...
    wait_until(lambda: fake.receipt("cafe", 1)["fiscal_id"] == "F")  # ...it lands anyway
    entry = fake.stats()["receipts"]["cafe:1"]
    assert (entry["patch"], entry["patch_ok"]) == (1, 1)
    started = time.monotonic()
    assert patch(client, tok, 1, {"lock": True}).status_code == 200  # only once
    assert time.monotonic() - started < 0.4
    fake.slow_next("cafe", 2, 0.3, count=2)
    for _ in range(2):
        started = time.monotonic()
        get(client, tok, 2)
        assert time.monotonic() - started >= 0.3
    with pytest.raises(ValueError):
        fake.slow_next("cafe", 2, 0.3, count=0)


def test_patch_ok_counts_only_applied_patches(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.success_false("cafe", 1, "x", method="PATCH")
    assert patch(client, tok, 1, {"fiscal_id": "F"}).json()["success"] is False
    assert patch(client, tok, 1, {"fiscal_id": ""}).status_code == 400
    assert patch(client, tok, 1, {"fiscal_id": "F"}).status_code == 200
    entry = fake.stats()["receipts"]["cafe:1"]
    assert (entry["patch"], entry["patch_ok"], len(entry["patched_at"])) == (3, 1, 1)


def test_appear_after(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    started = time.monotonic()
    fake.appear_after("cafe", 1, 0.4)
    assert get(client, tok, 1).status_code == 404
    assert patch(client, tok, 1, {"fiscal_id": "F"}).status_code == 404
    wait_until(lambda: get(client, tok, 1).status_code == 200)
    assert time.monotonic() - started >= 0.4


def test_close_after(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.close_after("cafe", 1, 0.4)
    receipt = get(client, tok, 1).json()["data"]
    assert (receipt["status"], receipt["closed_at"]) == (1, None)
    wait_until(lambda: get(client, tok, 1).json()["data"]["status"] == 2)
    assert TIME_PATTERN.match(fake.receipt("cafe", 1)["closed_at"])


def test_fail_brand_with_count(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_brand("cafe", 503, count=2)
    assert get(client, tok, 1).status_code == 503
    assert patch(client, tok, 2, {"lock": True}).status_code == 503
    assert auth(client).status_code == 200  # auth is not an authenticated call
    assert get(client, tok, 1).status_code == 200
    assert get(client, token(client, "bistro"), 1).status_code == 404


def test_fail_brand_with_duration(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_brand("cafe", 500, duration=0.4)
    assert get(client, tok, 1).status_code == 500
    assert get(client, tok, 1).status_code == 500
    wait_until(lambda: get(client, tok, 1).status_code == 200)


def test_brand_failure_comes_before_receipt_faults(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_next("cafe", 1, 404)
    fake.fail_brand("cafe", 500, count=1)
    assert get(client, tok, 1).status_code == 500
    assert get(client, tok, 1).status_code == 404
    assert get(client, tok, 1).status_code == 200


def test_reject_auth(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    fake.reject_auth("cafe")
    response = auth(client)
    assert response.status_code == 401
    assert error_of(response) == "authentication_failed"
    assert auth(client, "bistro").status_code == 200
    fake.reject_auth("cafe", enabled=False)
    assert auth(client).status_code == 200


def test_reset_faults(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.fail_next("cafe", 1, 500)
    fake.fail_brand("cafe", 503)
    fake.reject_auth("cafe")
    fake.reset_faults()
    assert get(client, tok, 1).status_code == 200
    assert auth(client).status_code == 200


def test_concurrent_patches_are_tracked(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fake.set_latency(0.3, "cafe", 1, method="PATCH")
    barrier = threading.Barrier(3)
    statuses: list[int] = []

    def one_patch() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=10) as own:
            barrier.wait()
            statuses.append(patch(own, tok, 1, {"fiscal_id": "F"}).status_code)

    threads = [threading.Thread(target=one_patch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert statuses == [200, 200, 200]
    stats = fake.stats()
    assert stats["receipts"]["cafe:1"]["max_concurrent_patches"] == 3
    assert stats["max_concurrent_patches"] == 3


# --- stats and control ---------------------------------------------------------------


def test_stats_and_request_log(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    started = time.time()
    get(client, tok, 1)
    patch(client, tok, 1, {"fiscal_id": "F"})
    get(client, tok, 404)
    stats = fake.stats()
    assert stats["auth_calls"] == {"cafe": 1}
    assert stats["requests"] == {"cafe": 3}
    assert stats["failed"] == {"cafe": 1}
    entry = stats["receipts"]["cafe:1"]
    patched_at = entry.pop("patched_at")
    assert entry == {
        "get": 1,
        "patch": 1,
        "patch_bodies": [{"fiscal_id": "F"}],
        "max_concurrent_patches": 1,
        "patch_ok": 1,
    }
    assert len(patched_at) == 1 and started <= patched_at[0] <= time.time()
    log = stats["request_log"]
    assert [entry[1:] for entry in log] == [
        ["POST", "cafe", None, 200],
        ["GET", "cafe", 1, 200],
        ["PATCH", "cafe", 1, 200],
        ["GET", "cafe", 404, 404],
    ]
    assert all(started - 1 <= entry[0] <= time.time() for entry in log)
    json.dumps(stats)
    fake.reset_stats()
    assert fake.stats()["request_log"] == []
    assert fake.stats()["receipts"] == {}


def test_http_control_endpoints(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    tok = token(client)
    fault = {"kind": "fail_next", "brand": "cafe", "receipt_id": 1, "status": 500}
    assert client.post("/_fake/faults", json=fault).json()["success"] is True
    assert get(client, tok, 1).status_code == 500
    stats = client.get("/_fake/stats").json()
    assert stats["receipts"]["cafe:1"]["get"] == 1
    assert stats["failed"] == {"cafe": 1}

    added = client.post("/_fake/receipts", json={"brand": "cafe", "receipt": {"id": 60}})
    assert added.json()["data"]["id"] == 60
    assert client.get("/_fake/receipts/cafe/60").json()["data"]["fiscal_id"] is None
    assert client.get("/_fake/receipts/cafe/61").status_code == 404
    assert client.post("/_fake/receipts", json={"brand": "x", "receipt": {"id": 1}}).is_error

    usage = {"kind": "external_usage", "brand": "cafe", "used": 298}
    assert client.post("/_fake/faults", json=usage).status_code == 200
    last_slot = get(client, tok, 60)
    assert (last_slot.status_code, last_slot.headers["RateLimit-Remaining"]) == (200, "0")
    assert get(client, tok, 60).status_code == 429
    assert client.post("/_fake/reset-faults").status_code == 200
    assert get(client, tok, 60).status_code == 200

    client.post("/_fake/faults", json={"kind": "revoke_tokens", "brand": "cafe"})
    assert get(client, tok, 60).status_code == 401
    assert client.post("/_fake/faults", json={"kind": "explode"}).status_code == 400
    assert client.post("/_fake/faults", json={"kind": "latency", "bogus": 1}).status_code == 400
    assert client.post("/_fake/reset-stats").status_code == 200
    assert client.get("/_fake/stats").json()["request_log"] == []
    assert fake.receipt("cafe", 60) is not None


def test_every_fault_kind_over_http(api: tuple[FakeClopos, httpx.Client]) -> None:
    fake, client = api
    kinds = [
        {"kind": "success_false", "brand": "cafe", "receipt_id": 1, "error": "x"},
        {"kind": "latency", "seconds": 0.01},
        {"kind": "appear_after", "brand": "cafe", "receipt_id": 2, "seconds": 0.1},
        {"kind": "close_after", "brand": "cafe", "receipt_id": 3, "seconds": 0.1},
        {"kind": "fail_brand", "brand": "cafe", "status": 500, "count": 1},
        {"kind": "reject_auth", "brand": "bistro"},
        {"kind": "slow_next", "brand": "cafe", "receipt_id": 4, "seconds": 0.01},
    ]
    for body in kinds:
        response = client.post("/_fake/faults", json=body)
        assert response.status_code == 200, (body, response.text)
    assert auth(client, "bistro").status_code == 401
    tok = token(client)
    assert get(client, tok, 1).status_code == 500
    assert get(client, tok, 1).json()["success"] is False
    assert fake.receipt("cafe", 3)["status"] == 1


# --- seed, instances, serve ----------------------------------------------------------


def test_seed_with_faults() -> None:
    seed = {
        "integrator_id": "seed-integrator",
        "brands": {"shop": {"client_id": "s-id", "client_secret": "s-secret"}},
        "receipts": [
            {"brand": "shop", "id": 1, "fiscal_id": "OLD", "total": 1234},
            {"id": 2, "fault": {"appear_after": 0.3}},
            {"id": 3, "fault": {"close_after": 0.3}},
            {"id": 4, "fault": {"fail_next": {"status": 500, "count": 2}}},
            {"id": 5, "fault": {"latency": 0.3}},
        ],
    }
    fake = FakeClopos()
    fake.load_seed(seed)
    try:
        with httpx.Client(base_url=fake.start(), timeout=10) as client:
            body = {
                "client_id": "s-id",
                "client_secret": "s-secret",
                "brand": "shop",
                "integrator_id": "seed-integrator",
            }
            tok = client.post("/v2/auth", json=body).json()["token"]
            first = get(client, tok, 1).json()["data"]
            assert (first["fiscal_id"], first["total"]) == ("OLD", 1234)
            assert get(client, tok, 2).status_code == 404
            assert get(client, tok, 3).json()["data"]["status"] == 1
            assert [get(client, tok, 4).status_code for _ in range(3)] == [500, 500, 200]
            started = time.monotonic()
            assert get(client, tok, 5).status_code == 200
            assert time.monotonic() - started >= 0.3
            wait_until(lambda: get(client, tok, 2).status_code == 200)
            wait_until(lambda: get(client, tok, 3).json()["data"]["status"] == 2)
    finally:
        fake.stop()


def test_seed_rejects_unknown_fault() -> None:
    fake = FakeClopos(brands={"b": {"client_id": "i", "client_secret": "s"}})
    with pytest.raises(ValueError, match="unknown fault"):
        fake.load_seed({"receipts": [{"id": 1, "fault": {"explode": 1}}]})


def test_default_seed() -> None:
    fake = FakeClopos()
    fake.load_seed(default_seed())
    receipts = [fake.receipt("openapitest", rid) for rid in range(1, 21)]
    assert all(r is not None and r["status"] == 2 and r["fiscal_id"] is None for r in receipts)
    assert fake.receipt("openapitest", 21) is None
    assert default_seed()["brands"]["openapitest"]["client_id"] == "demo-client"


def test_two_instances_at_once(make_fake: MakeFake) -> None:
    first, first_client = make_fake()
    second, second_client = make_fake(brands={"other": {"client_id": "o", "client_secret": "p"}})
    assert first_client.base_url != second_client.base_url
    tok = token(first_client)
    assert get(first_client, tok, 1).status_code == 200
    assert get(second_client, tok, 1).status_code == 401  # tokens are per instance
    assert first.stats()["requests"] == {"cafe": 1}
    assert second.stats()["requests"] == {}
    base = str(second_client.base_url)
    second.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/_fake/stats", timeout=2)
    assert get(first_client, tok, 1).status_code == 200


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    code = "from worker.fake_clopos import serve; serve('127.0.0.1', 0, None)"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.match(
            r"fake Clopos API on (http://127\.0\.0\.1:\d+) \(brands: openapitest\)", line
        )
        assert match, line
        body = {
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "brand": "openapitest",
            "integrator_id": "fake-integrator",
        }
        with httpx.Client(base_url=match.group(1), timeout=10) as client:
            tok = client.post("/v2/auth", json=body).json()["token"]
            assert get(client, tok, 20).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
