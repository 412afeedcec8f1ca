"""The operator's console (worker/web/app.py) over HTTP: Starlette's TestClient on fakeredis,
no server. The login and its slow-down, sessions and their cookies, roles and CSRF, every
page and action, hostile text made inert, the security headers, --no-auth."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import time
import warnings
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fakeredis
import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker import dlq, keys
from worker.audit import AuditTrail
from worker.dlq import MAX_PAYLOAD_BYTES, DeadLetterStore
from worker.oplog import OperatorLog
from worker.settings import Settings
from worker.web import app as web_app
from worker.web.app import (
    LOGIN_COOKIE,
    MAX_BODY_BYTES,
    MAX_SELECTED,
    PAGE_SIZE,
    SESSION_COOKIE,
    create_app,
)
from worker.web.auth import User, Users, hash_password, load_users
from worker.web.render import SHOWN_PAYLOAD_CHARS, payload_view, printable

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2; httpx works alike
    warnings.simplefilter("ignore", UserWarning)
    from starlette.testclient import TestClient

PASSWORD = "correct horse battery"
HASH = hash_password(PASSWORD)  # once per module: scrypt costs ~50 ms a hash
USERS = Users({"op": User("op", "operator", HASH), "viewer": User("viewer", "viewer", HASH)})
STREAM = "fiscal:results"
SESSION_KEYS = keys.web_session("*")  # a pattern, for KEYS

GET_PAGES = [
    "/",
    "/overview/live",
    "/dead-letters",
    "/dead-letters?reason=unknown_brand",
    "/dead-letters/dl-1",
    "/dead-letters/dl-1/payload",
    "/receipts",
    "/receipts?brand=acme&receipt_id=7",
    "/brands",
    "/log",
]
# Every POST that acts on the store, with a form that would act if it were allowed.
ACTIONS = [
    ("/dead-letters/replay", {"id": ["dl-1", "dl-2"], "back": "/dead-letters"}),
    ("/dead-letters/confirm", {"action": "purge", "scope": "selected", "id": ["dl-1"]}),
    ("/dead-letters/confirm", {"action": "replay", "scope": "matching"}),
    ("/dead-letters/apply", {"action": "purge", "scope": "selected", "id": ["dl-1"]}),
    ("/dead-letters/apply", {"action": "replay", "scope": "one", "id": ["dl-2"]}),
    ("/dead-letters/apply", {"action": "purge", "scope": "matching", "upto": "2"}),
]
POST_ROUTES = ["/logout", "/dead-letters/replay", "/dead-letters/confirm", "/dead-letters/apply"]


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FISCAL_* setting of the shell, and no second's wait after each failed login."""
    for name in [n for n in os.environ if n.startswith("FISCAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(web_app, "FAILURE_DELAY_SECONDS", 0)


@pytest.fixture
def settings() -> Settings:
    return Settings(ingest_stream=STREAM)


@pytest.fixture
def store(r: fakeredis.FakeRedis) -> DeadLetterStore:
    return DeadLetterStore(r)


@pytest.fixture
def client(r: fakeredis.FakeRedis, settings: Settings) -> TestClient:
    return make_client(r, settings, USERS)


def make_client(
    r: fakeredis.FakeRedis,
    settings: Settings,
    users: Users | None,
    base_url: str = "http://127.0.0.1",
) -> TestClient:
    return TestClient(create_app(settings, r, users), base_url=base_url, follow_redirects=False)


def log_in(client: TestClient, user: str = "op") -> str:
    """A session for `user` straight in Redis (no scrypt), its cookie on the client; the
    session's CSRF token."""
    known = USERS.get(user)
    assert known is not None
    cookie, session = client.app.state.console.sessions.create(user, known.role)
    client.cookies.set(SESSION_COOKIE, cookie)
    return session.csrf


def form_login(
    client: TestClient, user: str = "op", password: str = PASSWORD, next: str = "/"
) -> Any:
    """The login as a browser does it: the form's page (its CSRF cookie), then the POST."""
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login", data={"csrf": token, "user": user, "password": password, "next": next}
    )


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


def add(
    store: DeadLetterStore,
    *,
    reason: str = "unknown_brand",
    brand: str | None = "acme",
    receipt_id: int | None = 7,
    payload: str | None = None,
    error: str = "no credentials",
    **more: Any,
) -> str:
    if payload is None:
        payload = json.dumps({"receipt_id": receipt_id, "brand": brand, "fiscal_id": "F-7"})
    return store.add(
        reason=reason,
        payload=payload,
        error=error,
        brand=brand,
        receipt_id=receipt_id,
        fiscal_id="F-7",
        **more,
    )


def listed(page: str) -> list[str]:
    """The entry ids of a dead-letters page, in order."""
    return re.findall(r'<tr data-id="(dl-\d+)">', page)


def older_link(page: str) -> str | None:
    match = re.search(r'<a href="([^"]+)" id="older">', page)
    return html.unescape(match.group(1)) if match else None


def form_fields(page: str, action: str) -> dict[str, list[str]]:
    """The hidden fields of the page's form posting to `action`, as a browser sends them."""
    match = re.search(
        rf'<form method="post" action="{re.escape(action)}"[^>]*>(.*?)</form>', page, re.S
    )
    assert match, f"no form posting to {action}"
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)">', match.group(1)
    ):
        fields.setdefault(name, []).append(html.unescape(value))
    return fields


def pre_payload(page: str) -> str:
    match = re.search(r'<pre class="payload" id="payload">(.*?)</pre>', page, re.S)
    assert match, "no payload on the page"
    return match.group(1)


def flash_after(client: TestClient, response: Any) -> str:
    """Follow an action's redirect; the message the page shows."""
    assert response.status_code == 303, response.text
    page = client.get(response.headers["location"])
    match = re.search(r'<p class="flash" id="flash">(.*?)</p>', page.text, re.S)
    assert match, "no message after the action"
    return html.unescape(match.group(1))


def state(r: fakeredis.FakeRedis, store: DeadLetterStore) -> tuple[Any, ...]:
    """What an action would change: the entries, the ingest stream, the operator log."""
    return (
        sorted(r.zrange(keys.DLQ_INDEX, 0, -1)),
        store.stats()["total"],
        r.xlen(STREAM),
        r.xlen(keys.OPLOG),
    )


def everything_in(r: fakeredis.FakeRedis) -> str:
    """Every key and every value in Redis, as one text."""
    parts: list[str] = []
    for key in r.scan_iter("*"):
        parts.append(key)
        kind = r.type(key)
        if kind == "string":
            parts.append(r.get(key) or "")
        elif kind == "hash":
            parts += [f"{k}={v}" for k, v in r.hgetall(key).items()]
        elif kind == "zset":
            parts += [f"{m}={s}" for m, s in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            parts += r.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(r.smembers(key))
        elif kind == "stream":
            parts += [json.dumps(entry) for entry in r.xrange(key)]
    return "\n".join(parts)


def session_cookie(response: Any) -> tuple[str, set[str]]:
    """(the fw_session cookie's value, its attributes in lower case) from Set-Cookie."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{SESSION_COOKIE}="):
            value, *attributes = (part.strip() for part in header.split(";"))
            return value.split("=", 1)[1], {a.lower() for a in attributes}
    raise AssertionError("no session cookie set")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- login required ------------------------------------------------------------------


@pytest.mark.parametrize("path", GET_PAGES)
def test_every_page_needs_a_login(client: TestClient, store: DeadLetterStore, path: str) -> None:
    add(store)
    response = client.get(path)
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": [path]}
    assert "no credentials" not in response.text


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_post_without_a_session_is_refused(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore, path: str
) -> None:
    add(store)
    before = state(r, store)
    response = client.post(path, data={"action": "purge", "scope": "selected", "id": "dl-1"})
    assert response.status_code == 403
    assert state(r, store) == before


def test_health_and_static_files_need_no_login(client: TestClient) -> None:
    health = client.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok")
    for path in ("/static/console.css", "/static/console.js"):
        assert client.get(path).status_code == 200


def test_health_says_when_redis_is_down(
    client: TestClient, r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> None:
        raise redis_lib.exceptions.ConnectionError("refused")

    monkeypatch.setattr(r, "ping", down)
    assert client.get("/healthz").status_code == 503


def test_a_page_says_when_redis_is_down(
    client: TestClient, r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_in(client)

    def down(*args: object) -> None:
        raise redis_lib.exceptions.ConnectionError("refused")

    monkeypatch.setattr(r, "hgetall", down)
    response = client.get("/dead-letters")
    assert response.status_code == 503
    assert response.text == "Redis is unavailable (ConnectionError); try again"


def test_login_leads_to_the_page_asked_for(client: TestClient) -> None:
    response = form_login(client, next="/dead-letters?reason=auth_failed")
    assert response.status_code == 303
    assert response.headers["location"] == "/dead-letters?reason=auth_failed"
    page = client.get("/dead-letters?reason=auth_failed")
    assert page.status_code == 200
    assert "op · operator" in page.text


def test_the_login_page_carries_next(client: TestClient) -> None:
    page = client.get("/login?next=/brands").text
    assert '<input type="hidden" name="next" value="/brands">' in page


def test_wrong_password_is_401_and_counted(client: TestClient, r: fakeredis.FakeRedis) -> None:
    response = form_login(client, password="wrong password")
    assert response.status_code == 401
    assert "Wrong user name or password." in response.text
    assert SESSION_COOKIE not in response.cookies
    assert r.keys(SESSION_KEYS) == []
    assert r.hget(keys.web_login_failures(digest("user:op\nclient:testclient")), "failures") == "1"
    assert r.hget(keys.web_login_failures(digest("client:testclient")), "failures") == "1"
    assert client.get("/").status_code == 303  # still not logged in


def test_unknown_user_is_401_the_same(client: TestClient, r: fakeredis.FakeRedis) -> None:
    response = form_login(client, user="mallory")
    assert response.status_code == 401
    assert "Wrong user name or password." in response.text
    pair = keys.web_login_failures(digest("user:mallory\nclient:testclient"))
    assert r.hget(pair, "failures") == "1"


def test_lockout_after_five_failures(client: TestClient, r: fakeredis.FakeRedis) -> None:
    for _ in range(5):
        assert form_login(client, password="guess").status_code == 401
    response = form_login(client)  # the right password: still refused, for now
    assert response.status_code == 429
    assert re.search(r"Too many failed logins: try again in 1[45] s\.", response.text)
    assert r.keys(SESSION_KEYS) == []
    assert client.get("/").status_code == 303
    # the refusal is not counted as one more failure
    assert r.hget(keys.web_login_failures(digest("user:op\nclient:testclient")), "failures") == "5"


def test_a_success_clears_the_failures(client: TestClient, r: fakeredis.FakeRedis) -> None:
    for _ in range(4):
        assert form_login(client, password="guess").status_code == 401
    assert form_login(client).status_code == 303
    # the (user, client) count is gone; the client's keeps its 4 failures, not the success
    assert r.keys(keys.web_login_failures("*")) == [
        keys.web_login_failures(digest("client:testclient"))
    ]
    assert r.hget(keys.web_login_failures(digest("client:testclient")), "failures") == "4"


@pytest.mark.parametrize("case", ["field missing", "field wrong", "cookie missing"])
def test_login_form_needs_its_csrf_value(
    client: TestClient, r: fakeredis.FakeRedis, case: str
) -> None:
    token = csrf_of(client.get("/login").text)
    form = {"user": "op", "password": PASSWORD, "csrf": token}
    if case == "field missing":
        del form["csrf"]
    elif case == "field wrong":
        form["csrf"] = token[:-1] + ("A" if token[-1] != "A" else "B")
    else:
        client.cookies.clear()
    response = client.post("/login", data=form)
    assert response.status_code == 403
    assert "The form expired" in response.text
    assert r.keys(SESSION_KEYS) == []
    assert r.keys(keys.web_login_failures("*")) == []  # not a password failure


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "https://evil.example",
        "/\\evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/\t/evil.example",
        "",
    ],
)
def test_next_never_leaves_the_site(client: TestClient, target: str) -> None:
    response = form_login(client, next=target)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    page = client.get("/login", params={"next": target}).text
    assert '<input type="hidden" name="next" value="/">' in page


def test_logout_ends_the_session(client: TestClient, r: fakeredis.FakeRedis) -> None:
    response = form_login(client)
    cookie, _ = session_cookie(response)
    assert r.exists(keys.web_session(digest(cookie)))
    csrf = csrf_of(client.get("/").text)
    response = client.post("/logout", data={"csrf": csrf})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert not r.exists(keys.web_session(digest(cookie)))
    assert r.keys(SESSION_KEYS) == []
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie)  # the old cookie, replayed
    assert client.get("/").status_code == 303


# --- the session cookie ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_session_cookie_flags(r: fakeredis.FakeRedis, settings: Settings, scheme: str) -> None:
    client = make_client(r, settings, USERS, base_url=f"{scheme}://127.0.0.1")
    response = form_login(client)
    assert response.status_code == 303
    _, attributes = session_cookie(response)
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes
    assert f"max-age={int(settings.web_session_seconds)}" in attributes
    assert ("secure" in attributes) is (scheme == "https")
    assert client.get("/").status_code == 200  # the browser sends it back


def test_login_form_cookie_flags(r: fakeredis.FakeRedis, settings: Settings) -> None:
    for scheme in ("http", "https"):
        client = make_client(r, settings, USERS, base_url=f"{scheme}://127.0.0.1")
        [header] = [
            h
            for h in client.get("/login").headers.get_list("set-cookie")
            if h.startswith(f"{LOGIN_COOKIE}=")
        ]
        attributes = {a.strip().lower() for a in header.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/login"} <= attributes
        assert ("secure" in attributes) is (scheme == "https")


def test_redis_keeps_the_cookies_sha256_never_the_cookie(
    client: TestClient, r: fakeredis.FakeRedis, settings: Settings
) -> None:
    response = form_login(client)
    cookie, _ = session_cookie(response)
    key = keys.web_session(digest(cookie))
    assert r.keys(SESSION_KEYS) == [key]
    assert r.hget(key, "user") == "op"
    assert 0 < r.ttl(key) <= settings.web_session_seconds
    assert cookie not in everything_in(r)
    assert PASSWORD not in everything_in(r)


# --- roles -----------------------------------------------------------------------------


OPERATOR_BUTTONS = (
    'id="replay-selected"',
    'id="purge-selected"',
    'id="replay-matching"',
    'id="purge-matching"',
    'id="select-all"',
)
ENTRY_BUTTONS = ('id="replay"', 'id="purge"')


def test_a_viewer_sees_every_page_but_no_action(client: TestClient, store: DeadLetterStore) -> None:
    add(store)
    log_in(client, "viewer")
    for path in GET_PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
    page = client.get("/dead-letters").text
    assert listed(page) == ["dl-1"]
    assert "viewer · viewer" in page
    for button in OPERATOR_BUTTONS:
        assert button not in page
    entry = client.get("/dead-letters/dl-1").text
    for button in ENTRY_BUTTONS:
        assert button not in entry


def test_an_operator_sees_the_actions(client: TestClient, store: DeadLetterStore) -> None:
    add(store)
    log_in(client, "op")
    page = client.get("/dead-letters").text
    for button in OPERATOR_BUTTONS:
        assert button in page
    entry = client.get("/dead-letters/dl-1").text
    for button in ENTRY_BUTTONS:
        assert button in entry


@pytest.mark.parametrize(("path", "form"), ACTIONS)
def test_a_viewer_cannot_act(
    client: TestClient,
    r: fakeredis.FakeRedis,
    store: DeadLetterStore,
    path: str,
    form: dict[str, Any],
) -> None:
    add(store)
    add(store)
    csrf = log_in(client, "viewer")
    before = state(r, store)
    response = client.post(path, data={**form, "csrf": csrf})
    assert response.status_code == 403
    assert "viewer is a viewer: replay and purge need an operator" in response.text
    assert state(r, store) == before


@pytest.mark.parametrize(("path", "form"), ACTIONS)
def test_an_operator_can_act(
    client: TestClient, store: DeadLetterStore, path: str, form: dict[str, Any]
) -> None:
    add(store)
    add(store)
    csrf = log_in(client, "op")
    response = client.post(path, data={**form, "csrf": csrf, "upto": "2"})
    assert response.status_code == (200 if path.endswith("/confirm") else 303)


@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
@pytest.mark.parametrize(("path", "form"), [*ACTIONS, ("/logout", {})])
def test_every_post_needs_the_csrf_token(
    client: TestClient,
    r: fakeredis.FakeRedis,
    store: DeadLetterStore,
    path: str,
    form: dict[str, Any],
    csrf: str | None,
) -> None:
    add(store)
    add(store)
    log_in(client, "op")
    before = state(r, store)
    data = {**form, "upto": "2"} if csrf is None else {**form, "upto": "2", "csrf": csrf}
    response = client.post(path, data=data)
    assert response.status_code == 403
    assert "missing or wrong CSRF token" in response.text
    assert state(r, store) == before
    assert len(r.keys(SESSION_KEYS)) == 1  # a logout without the token logs nobody out
    assert client.get("/").status_code == 200


def test_another_sessions_csrf_token_is_wrong(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    add(store)
    _, other = client.app.state.console.sessions.create("viewer", "viewer")
    log_in(client, "op")
    before = state(r, store)
    response = client.post("/dead-letters/replay", data={"csrf": other.csrf, "id": "dl-1"})
    assert response.status_code == 403
    assert state(r, store) == before


# --- the dead-letter list: filters -----------------------------------------------------


@pytest.fixture
def mixed(store: DeadLetterStore) -> DeadLetterStore:
    add(store, reason="auth_failed", brand="a", receipt_id=1)  # dl-1
    add(store, reason="receipt_not_found", brand="b", receipt_id=2)  # dl-2
    store.add(reason="invalid_message", payload="not json", error="not JSON")  # dl-3
    add(store, reason="auth_failed", brand="b", receipt_id=2)  # dl-4
    return store


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, ["dl-4", "dl-3", "dl-2", "dl-1"]),
        ({"reason": "auth_failed"}, ["dl-4", "dl-1"]),
        ({"brand": "b"}, ["dl-4", "dl-2"]),
        ({"brand": "(unknown)"}, ["dl-3"]),
        ({"receipt_id": "2"}, ["dl-4", "dl-2"]),
        ({"reason": "auth_failed", "brand": "b"}, ["dl-4"]),
        ({"reason": "auth_failed", "receipt_id": "2"}, ["dl-4"]),
        ({"brand": "nobody"}, []),
        ({"reason": "validation_failed"}, []),
        ({"reason": "", "brand": " b ", "receipt_id": ""}, ["dl-4", "dl-2"]),
    ],
)
def test_filters(
    client: TestClient, mixed: DeadLetterStore, query: dict[str, str], expected: list[str]
) -> None:
    log_in(client)
    response = client.get("/dead-letters", params=query)
    assert response.status_code == 200
    assert listed(response.text) == expected
    if not expected:
        assert 'id="no-entries"' in response.text


def test_filters_by_time_as_utc(client: TestClient, store: DeadLetterStore) -> None:
    for seen in (
        "2024-05-01T11:59:59Z",
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:59:59Z",
        "2024-05-01T13:00:00Z",
    ):
        add(store, last_seen=seen)  # dl-1 .. dl-4
    log_in(client)

    def ids(since: str = "", until: str = "") -> list[str]:
        response = client.get("/dead-letters", params={"since": since, "until": until})
        assert response.status_code == 200, response.text
        return listed(response.text)

    # a browser's datetime-local (no zone, maybe no seconds) is taken as UTC
    assert ids("2024-05-01T12:00", "2024-05-01T13:00") == ["dl-3", "dl-2"]
    assert ids("2024-05-01T12:00:00", "2024-05-01T12:59:59") == ["dl-2"]  # until: exclusive
    assert ids(since="2024-05-01T12:59:59") == ["dl-4", "dl-3"]
    assert ids(until="2024-05-01T12:00") == ["dl-1"]
    assert ids("2024-05-01T12:00:00Z", "2024-05-01T13:00:00Z") == ["dl-3", "dl-2"]
    assert ids("2024-05-01T14:00+02:00") == ["dl-4", "dl-3", "dl-2"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"reason": "bogus"}, "reason: one of invalid_message, unknown_brand"),
        ({"brand": "a b"}, "brand: 1-64 characters of A-Za-z0-9_.-"),
        ({"brand": "x:y"}, "brand: 1-64 characters of A-Za-z0-9_.-"),
        ({"brand": "b" * 65}, "brand: 1-64 characters of A-Za-z0-9_.-"),
        ({"receipt_id": "abc"}, "receipt id: a whole number >= 1"),
        ({"receipt_id": "0"}, "receipt id: a whole number >= 1"),
        ({"receipt_id": "-3"}, "receipt id: a whole number >= 1"),
        ({"receipt_id": "9" * 30}, "receipt id: a whole number >= 1"),
        ({"since": "yesterday"}, "from: a time like 2026-12-01T10:30 (UTC)"),
        ({"until": "2024-13-01T00:00"}, "to: a time like 2026-12-01T10:30 (UTC)"),
        (
            {"since": "2024-05-01T13:00", "until": "2024-05-01T12:00"},
            "the time range is empty: 'from' must be before 'to'",
        ),
        ({"before": "x"}, "before: a whole number >= 1"),
    ],
)
def test_bad_filter_values_are_400_with_a_message(
    client: TestClient, mixed: DeadLetterStore, query: dict[str, str], message: str
) -> None:
    log_in(client)
    response = client.get("/dead-letters", params=query)
    assert response.status_code == 400
    match = re.search(r'<p class="problem bad" id="filter-error">(.*?)</p>', response.text)
    assert match, "the error is not shown"
    assert html.unescape(match.group(1)).startswith(message)
    assert listed(response.text) == []
    # the filter form shows what was typed, to correct it
    for name, value in query.items():
        if name in ("brand", "receipt_id"):
            assert f'value="{html.escape(value, quote=True)}"' in response.text.replace(
                "&#34;", "&quot;"
            ).replace("&#39;", "&#x27;")


def test_hostile_filter_value_is_echoed_inert(client: TestClient, mixed: DeadLetterStore) -> None:
    log_in(client)
    response = client.get("/dead-letters", params={"brand": '"><script>alert(1)</script>'})
    assert response.status_code == 400
    assert "<script>alert(1)" not in response.text
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in response.text


# --- the dead-letter list: cursor pages ------------------------------------------------


def walk_pages(client: TestClient, first: str) -> list[list[str]]:
    """Every page from `first` on, following the "older" links."""
    pages: list[list[str]] = []
    url: str | None = first
    while url is not None:
        assert len(pages) < 20, "the pages never end"
        response = client.get(url)
        assert response.status_code == 200
        pages.append(listed(response.text))
        url = older_link(response.text)
    return pages


def test_pages_are_newest_first_disjoint_and_complete(
    client: TestClient, store: DeadLetterStore
) -> None:
    for _ in range(120):
        add(store)
    log_in(client)
    first = client.get("/dead-letters").text
    assert older_link(first) == "/dead-letters?before=71"
    pages = walk_pages(client, "/dead-letters")
    assert [len(page) for page in pages] == [PAGE_SIZE, PAGE_SIZE, 20]
    everything = [entry for page in pages for entry in page]
    assert everything == [f"dl-{n}" for n in range(120, 0, -1)]  # newest first, each once
    last = client.get("/dead-letters?before=21").text
    assert older_link(last) is None
    assert 'id="older"' not in last


def test_pages_keep_the_filter(client: TestClient, store: DeadLetterStore) -> None:
    for n in range(130):
        add(store, brand="a" if n % 2 else "b")
    log_in(client)
    first = client.get("/dead-letters?brand=a").text
    assert older_link(first) == f"/dead-letters?brand=a&before={130 - 2 * 49}"
    pages = walk_pages(client, "/dead-letters?brand=a")
    assert [len(page) for page in pages] == [50, 15]
    assert [e for page in pages for e in page] == [f"dl-{n}" for n in range(130, 0, -2)]


def test_a_filtered_page_over_the_scan_limit_is_partial_and_goes_on(
    client: TestClient, store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "SCAN_LIMIT", 10)
    monkeypatch.setattr(dlq, "HEAD_CHUNK", 5)
    add(store, receipt_id=99)  # dl-1, the only match, under 25 others
    for _ in range(25):
        add(store, receipt_id=1)
    log_in(client)
    first = client.get("/dead-letters?receipt_id=99").text
    assert listed(first) == []
    assert "Read 10 entries for this page without filling it." in first
    assert older_link(first) == "/dead-letters?receipt_id=99&before=17"
    second = client.get("/dead-letters?receipt_id=99&before=17").text
    assert "Read 10 entries" in second
    assert older_link(second) == "/dead-letters?receipt_id=99&before=7"
    last = client.get("/dead-letters?receipt_id=99&before=7").text
    assert listed(last) == ["dl-1"]
    assert "without filling it" not in last
    assert older_link(last) is None


# --- replay and purge ------------------------------------------------------------------


def test_replay_selected(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    for receipt_id in (1, 2, 3):
        add(store, receipt_id=receipt_id)
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/replay",
        data={"csrf": csrf, "id": ["dl-1", "dl-2", "dl-1"], "back": "/dead-letters?brand=acme"},
    )
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert location.path == "/dead-letters"
    assert parse_qs(location.query) == {"brand": ["acme"], "done": ["replayed 2, refused 0"]}
    assert [e["id"] for e in store.list()] == ["dl-3"]
    replayed = [fields for _, fields in r.xrange(STREAM)]
    assert [f["replay_of"] for f in replayed] == ["dl-1", "dl-2"]
    assert json.loads(replayed[0]["data"]) == {"receipt_id": 1, "brand": "acme", "fiscal_id": "F-7"}
    [entry] = OperatorLog(r).recent()
    assert (entry["who"], entry["via"], entry["action"]) == ("op", "web", "replay")
    assert (entry["count"], entry["refused"], entry["ids"]) == (2, 0, ["dl-1", "dl-2"])
    assert entry["selection"] == {"ids": 2}
    assert flash_after(client, response) == "replayed 2, refused 0"


def test_replay_uses_the_configured_stream(r: fakeredis.FakeRedis, store: DeadLetterStore) -> None:
    client = make_client(r, Settings(ingest_stream="other:stream"), USERS)
    add(store)
    csrf = log_in(client)
    client.post("/dead-letters/replay", data={"csrf": csrf, "id": "dl-1"})
    assert r.xlen("other:stream") == 1
    assert r.xlen(STREAM) == 0


def test_a_refused_replay_stays(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    store.add(reason="invalid_message", payload="x" * (MAX_PAYLOAD_BYTES + 1), error="big")
    store.add(reason="invalid_message", payload='{"receipt_id": "seven"}', error="bad field")
    add(store)
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/replay", data={"csrf": csrf, "id": ["dl-1", "dl-2", "dl-3"]}
    )
    message = flash_after(client, response)
    assert message.startswith("replayed 1, refused 2 (first refusal: dl-1: payload was truncated")
    assert "cannot replay" in message
    assert [e["id"] for e in store.list()] == ["dl-2", "dl-1"]
    assert [f["replay_of"] for _, f in r.xrange(STREAM)] == ["dl-3"]
    [entry] = OperatorLog(r).recent()
    assert (entry["count"], entry["refused"], entry["ids"]) == (1, 2, ["dl-3"])


def test_replaying_one_refused_entry_goes_back_to_it(
    client: TestClient, store: DeadLetterStore
) -> None:
    store.add(reason="invalid_message", payload="not json", error="not JSON")
    csrf = log_in(client)
    entry_page = client.get("/dead-letters/dl-1").text
    response = client.post(
        "/dead-letters/apply", data=form_fields(entry_page, "/dead-letters/apply")
    )
    assert response.status_code == 303
    assert urlsplit(response.headers["location"]).path == "/dead-letters/dl-1"
    message = flash_after(client, response)
    assert "refused 1" in message and "dl-1: payload is still invalid" in message
    assert store.get("dl-1") is not None
    assert csrf in entry_page


def test_replaying_one_entry_when_redis_fails_says_so_on_the_list(
    client: TestClient, store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing during a replay from an entry's page: the answer is the list with
    what happened, not an error page from looking the entry up again."""
    entry_id = add(store)
    log_in(client)
    entry_page = client.get(f"/dead-letters/{entry_id}").text
    console = client.app.state.console

    def gone(*args: object, **kwargs: object) -> None:
        raise redis_lib.exceptions.ConnectionError("gone")

    monkeypatch.setattr(console.store, "replay", gone)
    monkeypatch.setattr(console.store, "get", gone)  # any look-up would fail too
    response = client.post(
        "/dead-letters/apply", data=form_fields(entry_page, "/dead-letters/apply")
    )
    assert response.status_code == 303
    assert urlsplit(response.headers["location"]).path == "/dead-letters"
    message = parse_qs(urlsplit(response.headers["location"]).query)["done"][0]
    assert message.startswith("replayed 0, refused 0; then Redis failed (ConnectionError)")


def test_replaying_one_entry_from_its_page(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    add(store)
    add(store, receipt_id=8)
    log_in(client)
    entry_page = client.get("/dead-letters/dl-2").text
    response = client.post(
        "/dead-letters/apply", data=form_fields(entry_page, "/dead-letters/apply")
    )
    assert flash_after(client, response) == "replayed 1, refused 0"
    assert [f["replay_of"] for _, f in r.xrange(STREAM)] == ["dl-2"]
    assert OperatorLog(r).recent()[0]["selection"] == {"id": "dl-2"}


def test_the_confirmation_names_the_count(client: TestClient, store: DeadLetterStore) -> None:
    for _ in range(4):
        add(store)
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/confirm",
        data={
            "csrf": csrf,
            "action": "purge",
            "scope": "selected",
            "id": ["dl-1", "dl-2", "dl-4", "dl-99"],
            "back": "/dead-letters",
        },
    )
    assert response.status_code == 200
    assert "<h1>Purge 3 entries?</h1>" in response.text
    assert "This deletes 3 dead-letter entries for good." in response.text
    assert store.count() == 4  # nothing done yet
    fields = form_fields(response.text, "/dead-letters/apply")
    assert fields["id"] == ["dl-1", "dl-2", "dl-4", "dl-99"]
    assert (fields["action"], fields["scope"], fields["upto"]) == (["purge"], ["selected"], ["4"])


def test_a_confirmation_of_nothing_offers_nothing(
    client: TestClient, store: DeadLetterStore
) -> None:
    add(store)
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/confirm",
        data={"csrf": csrf, "action": "replay", "scope": "matching", "reason": "auth_failed"},
    )
    assert "<h1>Replay 0 entries?</h1>" in response.text
    assert 'action="/dead-letters/apply"' not in response.text


@pytest.mark.parametrize("action", ["purge", "replay"])
def test_apply_matching_leaves_entries_added_after_the_confirmation(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore, action: str
) -> None:
    for receipt_id in (1, 2, 3):
        add(store, reason="auth_failed", receipt_id=receipt_id)
    add(store, reason="receipt_not_found")  # dl-4: not matching
    csrf = log_in(client)
    page = client.get("/dead-letters?reason=auth_failed").text
    confirm = client.post(
        "/dead-letters/confirm",
        data={**form_fields(page, "/dead-letters/confirm"), "action": action},
    )
    assert f"<h1>{action.capitalize()} 3 entries?</h1>" in confirm.text
    assert "Matching: reason=auth_failed." in confirm.text
    add(store, reason="auth_failed", receipt_id=5)  # dl-5: after the confirmation
    fields = form_fields(confirm.text, "/dead-letters/apply")
    assert fields["csrf"] == [csrf]
    response = client.post("/dead-letters/apply", data=fields)
    assert response.status_code == 303
    assert urlsplit(response.headers["location"]).path == "/dead-letters"
    assert parse_qs(urlsplit(response.headers["location"]).query)["reason"] == ["auth_failed"]
    assert sorted(e["id"] for e in store.list()) == ["dl-4", "dl-5"]
    [entry] = OperatorLog(r).recent()
    assert entry["action"] == action
    assert entry["count"] == 3
    assert sorted(entry["ids"]) == ["dl-1", "dl-2", "dl-3"]
    assert entry["selection"] == {"filter": {"reason": "auth_failed"}}
    if action == "replay":
        assert [f["replay_of"] for _, f in r.xrange(STREAM)] == ["dl-1", "dl-2", "dl-3"]
        assert flash_after(client, response) == "replayed 3, refused 0"
    else:
        assert r.xlen(STREAM) == 0
        assert flash_after(client, response) == "purged 3 entries"


def test_purge_everything_matching_a_filter(
    client: TestClient, r: fakeredis.FakeRedis, mixed: DeadLetterStore
) -> None:
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/apply",
        data={
            "csrf": csrf,
            "action": "purge",
            "scope": "matching",
            "brand": "b",
            "receipt_id": "2",
            "upto": "4",
        },
    )
    assert flash_after(client, response) == "purged 2 entries"
    assert [e["id"] for e in mixed.list()] == ["dl-3", "dl-1"]
    response = client.post(
        "/dead-letters/apply",
        data={"csrf": csrf, "action": "purge", "scope": "matching", "upto": "4"},
    )
    assert flash_after(client, response) == "purged 2 entries"
    assert mixed.count() == 0
    assert [e["selection"] for e in OperatorLog(r).recent()] == [
        {"filter": "all"},
        {"filter": {"brand": "b", "receipt_id": "2"}},
    ]


def test_purge_one_entry_from_its_page(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    add(store)
    add(store)
    log_in(client)
    entry_page = client.get("/dead-letters/dl-1").text
    confirm = client.post(
        "/dead-letters/confirm", data=form_fields(entry_page, "/dead-letters/confirm")
    )
    assert "<h1>Purge 1 entry?</h1>" in confirm.text
    assert store.get("dl-1") is not None
    response = client.post(
        "/dead-letters/apply", data=form_fields(confirm.text, "/dead-letters/apply")
    )
    assert flash_after(client, response) == "purged 1 entry"
    assert [e["id"] for e in store.list()] == ["dl-2"]
    [entry] = OperatorLog(r).recent()
    assert (entry["action"], entry["selection"], entry["ids"]) == (
        "purge",
        {"id": "dl-1"},
        ["dl-1"],
    )
    assert client.get("/dead-letters/dl-1").status_code == 404


@pytest.mark.parametrize(
    ("path", "form", "message"),
    [
        ("/dead-letters/replay", {}, "no entry selected"),
        (
            "/dead-letters/replay",
            {"id": [f"dl-{n}" for n in range(1, MAX_SELECTED + 2)]},
            f"at most {MAX_SELECTED} entries at once",
        ),
        (
            "/dead-letters/confirm",
            {"action": "delete", "scope": "selected", "id": "dl-1"},
            "unknown action",
        ),
        ("/dead-letters/confirm", {"action": "purge", "scope": "everything"}, "unknown action"),
        ("/dead-letters/apply", {"action": "purge", "scope": "selected"}, "no entry selected"),
        (
            "/dead-letters/apply",
            {"action": "purge", "scope": "matching", "upto": "x"},
            "upto: a whole number >= 1",
        ),
        (
            "/dead-letters/apply",
            {"action": "purge", "scope": "matching", "reason": "nope"},
            "reason: one of",
        ),
    ],
)
def test_bad_action_forms_are_400(
    client: TestClient,
    r: fakeredis.FakeRedis,
    store: DeadLetterStore,
    path: str,
    form: dict[str, Any],
    message: str,
) -> None:
    add(store)
    csrf = log_in(client)
    before = state(r, store)
    response = client.post(path, data={**form, "csrf": csrf})
    assert response.status_code == 400
    assert message in html.unescape(response.text)
    assert state(r, store) == before


def test_the_back_target_stays_on_the_site(client: TestClient, store: DeadLetterStore) -> None:
    add(store)
    csrf = log_in(client)
    response = client.post(
        "/dead-letters/replay", data={"csrf": csrf, "id": "dl-1", "back": "//evil.example/x"}
    )
    assert response.headers["location"].startswith("/?done=")


def test_the_operator_log_page(client: TestClient, r: fakeredis.FakeRedis) -> None:
    OperatorLog(r).record(
        who="<b>alice</b>",
        via="cli",
        action="purge",
        selection={"reason": "<i>"},
        count=3,
        ids=["dl-1"],
    )
    log_in(client, "viewer")
    page = client.get("/log").text
    assert "&lt;b&gt;alice&lt;/b&gt;" in page
    assert "<b>alice" not in page and "<i>" not in page
    assert "purge" in page and "dl-1" in page


# --- the entry page: hostile text ------------------------------------------------------


def test_hostile_text_renders_inert(client: TestClient, store: DeadLetterStore) -> None:
    store.add(
        reason="invalid_message",
        payload="<script>alert(1)</script> \x1b[31m red \x00 nul \u202e txet \u2028 sep",
        error='<img src=x onerror="alert(2)"> \x1b]0;title\x07',
        brand="<b>brand</b>",
        fiscal_id="\u202eF-7",
        receipt_id=7,
    )
    log_in(client)
    for path in ("/dead-letters/dl-1", "/dead-letters"):
        page = client.get(path).text
        assert "<script>alert" not in page
        assert "<img" not in page and "<b>brand" not in page
        for raw in ("\x1b", "\x00", "\x07", "\u202e", "\u2028"):
            assert raw not in page, repr(raw)
        assert "\\x1b" in page and "\\u202e" in page
    page = client.get("/dead-letters/dl-1").text
    shown = pre_payload(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert html.unescape(shown) == (
        "<script>alert(1)</script> \\x1b[31m red \\x00 nul \\u202e txet \\u2028 sep"
    )
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt; \\x1b]0;title\\x07" in page
    assert "&lt;b&gt;brand&lt;/b&gt;" in page


def test_lone_surrogates_do_not_crash(client: TestClient, store: DeadLetterStore) -> None:
    store.add(reason="invalid_message", payload="a\ud800b", error="e\udfff", fiscal_id="f\ud83d")
    store.add(reason="invalid_message", payload='{"brand": "\\ud800"}', error="escaped one")
    log_in(client)
    for path in ("/dead-letters", "/dead-letters/dl-1", "/dead-letters/dl-2", "/"):
        response = client.get(path)
        assert response.status_code == 200, path
        response.content.decode("utf-8")  # strict: no surrogate reached the page
    first = client.get("/dead-letters/dl-1").text
    assert "e\\udfff" in first and "f\\ud83d" in first
    assert html.unescape(pre_payload(first)) == "a\\xed\\xa0\\x80b"  # its bytes, escaped
    second = client.get("/dead-letters/dl-2").text
    assert html.unescape(pre_payload(second)) == '{\n  "brand": "\\ud800"\n}'


def test_a_lone_surrogate_in_the_brand_does_not_crash(
    r: fakeredis.FakeRedis, settings: Settings, store: DeadLetterStore
) -> None:
    client = TestClient(
        create_app(settings, r, USERS), follow_redirects=False, raise_server_exceptions=False
    )
    store.add(reason="unknown_brand", payload="{}", error="x", brand="a\ud800", receipt_id=7)
    log_in(client)
    assert client.get("/dead-letters/dl-1").status_code == 200
    assert client.get("/dead-letters").status_code == 200


def test_a_one_mib_payload_shows_its_start_and_downloads_whole(
    client: TestClient, store: DeadLetterStore
) -> None:
    payload = "".join(chr(ord("a") + n % 26) for n in range(MAX_PAYLOAD_BYTES))
    store.add(reason="invalid_message", payload=payload, error="big")
    log_in(client)
    listing = client.get("/dead-letters")
    assert listing.status_code == 200
    assert len(listing.content) < 64 * 1024  # a list page never carries a payload
    page = client.get("/dead-letters/dl-1")
    assert page.status_code == 200
    assert pre_payload(page.text) == payload[:SHOWN_PAYLOAD_CHARS]
    assert f"{MAX_PAYLOAD_BYTES - SHOWN_PAYLOAD_CHARS:,} more characters not shown" in page.text
    assert '<a href="/dead-letters/dl-1/payload">Download the whole payload</a>' in page.text
    assert len(page.content) < SHOWN_PAYLOAD_CHARS + 16 * 1024
    download = client.get("/dead-letters/dl-1/payload")
    assert download.status_code == 200
    assert download.text == payload
    assert download.headers["content-type"].startswith("text/plain")
    assert download.headers["content-disposition"] == 'attachment; filename="dl-1-payload.txt"'
    assert download.headers["x-content-type-options"] == "nosniff"


def test_a_truncated_payload_says_so(client: TestClient, store: DeadLetterStore) -> None:
    store.add(reason="invalid_message", payload="y" * (MAX_PAYLOAD_BYTES + 10), error="huge")
    log_in(client)
    page = client.get("/dead-letters/dl-1").text
    sha = store.get("dl-1")["payload_sha256"]  # type: ignore[index]
    assert f"truncated when stored (its first 64 KiB kept; SHA-256 {sha})" in page
    assert f"{MAX_PAYLOAD_BYTES + 10:,} bytes" in page


def test_a_json_payload_is_pretty_printed(client: TestClient, store: DeadLetterStore) -> None:
    add(store, payload='{"receipt_id":7,"brand":"acme","lines":[1,2]}')
    log_in(client)
    page = client.get("/dead-letters/dl-1").text
    assert "json," in page
    assert html.unescape(pre_payload(page)) == (
        '{\n  "receipt_id": 7,\n  "brand": "acme",\n  "lines": [\n    1,\n    2\n  ]\n}'
    )


def test_an_unknown_entry_is_404(client: TestClient) -> None:
    log_in(client)
    response = client.get("/dead-letters/dl-<b>9")
    assert response.status_code == 404
    assert "no dead-letter entry dl-&lt;b&gt;9" in response.text
    assert client.get("/dead-letters/dl-9/payload").status_code == 404


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=120)  # surrogates too


@hypothesis_settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        ANY_TEXT,
        st.recursive(
            st.none() | st.integers() | ANY_TEXT,
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3)
            ),
            max_leaves=6,
        ).map(json.dumps),
    ),
    error=ANY_TEXT,
    brand=st.text(max_size=40),
    fiscal_id=ANY_TEXT,
)
def test_any_text_renders_inert(
    client: TestClient,
    store: DeadLetterStore,
    payload: str,
    error: str,
    brand: str,
    fiscal_id: str,
) -> None:
    entry_id = store.add(
        reason="validation_failed",
        payload=payload,
        error=error,
        brand=brand,
        fiscal_id=fiscal_id,
        receipt_id=7,
    )
    log_in(client)
    entry = store.get(entry_id)
    assert entry is not None
    response = client.get(f"/dead-letters/{entry_id}")
    assert response.status_code == 200
    page = response.content.decode("utf-8")
    shown = pre_payload(page)
    assert "<" not in shown and ">" not in shown
    text = html.unescape(shown)
    assert text == payload_view(entry)["text"]
    assert all(c.isprintable() or c in "\n\t" for c in text)
    errors = re.search(r'<td class="error">(.*?)</td>', page, re.S)
    assert errors is not None
    assert "<" not in errors.group(1)
    assert html.unescape(errors.group(1)) == printable(entry["error"])
    listing = client.get("/dead-letters")
    assert listing.status_code == 200
    listing.content.decode("utf-8")
    assert listed(listing.text)[0] == entry_id


# --- no secret on any page -------------------------------------------------------------


def all_pages(client: TestClient) -> list[Any]:
    return [client.get(path) for path in GET_PAGES]


def test_token_state_is_shown_never_its_value(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    now = time.time()
    r.zadd(keys.BRANDS, {"acme": now, "beta": now, "gamma": now})
    secret = json.dumps({"token": "SECRET-TOKEN-123", "expires_at": now + 3600})
    r.set(keys.token("acme"), secret, ex=3600)
    r.set(keys.token("beta"), secret.replace("123", "456"))
    r.set(keys.token_auth_failure("gamma"), "401 SECRET-AUTH-789", ex=10)
    add(store)
    log_in(client)
    for response in all_pages(client):
        assert response.status_code == 200
        for value in ("SECRET-TOKEN-123", "SECRET-TOKEN-456", "SECRET-AUTH-789"):
            assert value not in response.text
    brands = client.get("/brands").text
    assert "cached, 60 min left" in brands
    assert "<td>cached</td>" in brands
    assert "auth failing" in brands
    assert "cached" in client.get("/").text


def test_the_web_password_is_never_shown(r: fakeredis.FakeRedis, store: DeadLetterStore) -> None:
    password = "Hunter2-WEB-PASSWORD-0815"
    settings = Settings(ingest_stream=STREAM, web_password=password)
    users = load_users(settings)
    client = make_client(r, settings, users)
    add(store)
    assert client.get("/login").status_code == 200
    response = form_login(client, user="admin", password=password)
    assert response.status_code == 303
    pages = [response, *all_pages(client), client.get("/login"), client.get("/static/console.js")]
    for page in pages:
        assert page.status_code == 200 or page.status_code == 303
        assert password not in page.text
        assert password not in str(page.headers)
    assert "admin · operator" in client.get("/").text
    assert password not in everything_in(r)


# --- the overview ----------------------------------------------------------------------


def test_the_overview_shows_the_problems(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    now = time.time()
    r.zadd(keys.BRANDS, {"acme": now, "calm": now})
    r.hset(
        keys.breaker("acme"),
        mapping={
            keys.BREAKER_STATE: keys.BREAKER_OPEN,
            keys.BREAKER_UNTIL: repr(now + 60),
            keys.BREAKER_FAILURES: "5",
            keys.BREAKER_COOLDOWN: "30",
            keys.BREAKER_OPENED_AT: repr(now),
        },
    )
    r.xadd(STREAM, {"data": "{}"}, id=f"{int((now - 120) * 1000)}-0")
    add(store)
    log_in(client, "viewer")
    page = client.get("/").text
    problems = re.search(r'<section class="problems" id="problems">(.*?)</section>', page, re.S)
    assert problems is not None
    found = re.findall(r'<p class="problem (\w+)">(.*?)</p>', problems.group(1))
    texts = {text: level for level, text in found}
    assert texts["no worker is alive (no heartbeat)"] == "bad"
    assert texts["brand acme: circuit open"] == "bad"
    assert texts["1 dead letter(s) added this hour"] == "warn"
    [lag] = [t for t in texts if t.startswith("ingest lags")]
    assert re.fullmatch(r"ingest lags 1[12]\d s behind", lag)
    assert texts[lag] == "bad"
    assert not any("calm" in text for text in texts)
    assert '<tr class="bad">\n<td>acme</td>' in page
    assert "open (5 failures)" in page


def test_a_calm_overview(client: TestClient, r: fakeredis.FakeRedis) -> None:
    r.zadd(keys.WORKERS, {"host:1": time.time()})
    log_in(client)
    page = client.get("/").text
    assert "No problems: workers alive, circuits closed, ingest keeping up." in page
    assert 'class="problem bad"' not in page


def test_overview_live_is_the_partial(client: TestClient, store: DeadLetterStore) -> None:
    add(store)
    log_in(client)
    whole = client.get("/").text
    assert 'data-refresh="/overview/live"' in whole
    live = client.get("/overview/live")
    assert live.status_code == 200
    assert live.text.startswith('<section class="problems" id="problems">')
    assert "<html" not in live.text and "<nav>" not in live.text
    assert '<b id="dead-total">1</b>' in live.text
    assert live.headers["cache-control"] == "no-store"


# --- receipt lookup --------------------------------------------------------------------


def test_receipt_lookup(
    client: TestClient, r: fakeredis.FakeRedis, settings: Settings, store: DeadLetterStore
) -> None:
    trail = AuditTrail(
        r, ttl_seconds=settings.audit_ttl_seconds, max_attempts=settings.audit_max_attempts
    )
    trail.record_received("acme", 7, fiscal_id="F-7", device_id="printer-<7>", result_id="1-0")
    trail.record_attempt("acme", 7, call="GET", http_status=404, outcome="not found")
    trail.record_attempt("acme", 7, call="PATCH", http_status=400, outcome="refused")
    dlq_id = add(store, reason="validation_failed")
    add(store, receipt_id=8)  # another receipt's
    trail.set_state("acme", 7, "dead_lettered", dlq_id=dlq_id)
    log_in(client, "viewer")
    response = client.get("/receipts", params={"brand": "acme", "receipt_id": "7"})
    assert response.status_code == 200
    page = response.text
    assert '<span class="state state-dead_lettered" id="receipt-state">dead_lettered</span>' in page
    assert "printer-&lt;7&gt;" in page
    attempts = re.search(r'<table id="attempts">(.*?)</table>', page, re.S)
    assert attempts is not None
    rows = re.findall(r"<td>(GET|PATCH)</td><td>(\d+)</td><td>([^<]*)</td>", attempts.group(1))
    assert rows == [("GET", "404", "not found"), ("PATCH", "400", "refused")]
    assert '<a href="/dead-letters/dl-1">dl-1</a>' in page
    assert "dl-2" not in page


def test_a_receipts_dead_letter_beyond_the_scan_is_still_shown(
    client: TestClient,
    r: fakeredis.FakeRedis,
    settings: Settings,
    store: DeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlq, "SCAN_LIMIT", 5)
    monkeypatch.setattr(dlq, "HEAD_CHUNK", 5)
    trail = AuditTrail(r, ttl_seconds=600, max_attempts=5)
    trail.record_received("acme", 7, fiscal_id="F-7")
    dlq_id = add(store)
    for _ in range(10):
        add(store, receipt_id=1)
    trail.set_state("acme", 7, "dead_lettered", dlq_id=dlq_id)
    log_in(client)
    page = client.get("/receipts?brand=acme&receipt_id=7").text
    assert '<a href="/dead-letters/dl-1">dl-1</a>' in page
    assert "only its newest were searched" in page


def test_an_unknown_receipt_has_no_record(client: TestClient) -> None:
    log_in(client)
    response = client.get("/receipts?brand=acme&receipt_id=12")
    assert response.status_code == 200
    assert 'id="no-record"' in response.text
    assert "The worker has no record of acme receipt 12" in response.text
    assert 'id="no-dead-letters"' in response.text


def test_the_lookup_form_alone(client: TestClient) -> None:
    log_in(client)
    response = client.get("/receipts")
    assert response.status_code == 200
    assert 'id="lookup"' in response.text and 'id="no-record"' not in response.text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"brand": "a b", "receipt_id": "7"}, "brand: 1-64 characters"),
        ({"brand": "<script>", "receipt_id": "7"}, "brand: 1-64 characters"),
        ({"brand": "", "receipt_id": "7"}, "brand: 1-64 characters"),
        ({"brand": "acme", "receipt_id": ""}, "receipt id: a whole number >= 1"),
        ({"brand": "acme", "receipt_id": "seven"}, "receipt id: a whole number >= 1"),
        ({"brand": "acme", "receipt_id": "0"}, "receipt id: a whole number >= 1"),
    ],
)
def test_bad_receipt_lookups_are_400(
    client: TestClient, query: dict[str, str], message: str
) -> None:
    log_in(client)
    response = client.get("/receipts", params=query)
    assert response.status_code == 400
    assert message in html.unescape(response.text)
    assert "<script>" not in response.text.replace('<script src="/static/console.js" defer>', "")


# --- security headers, body limits ------------------------------------------------------


def assert_security_headers(response: Any) -> None:
    csp = response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_security_headers_on_every_response(client: TestClient, store: DeadLetterStore) -> None:
    add(store)
    responses = [
        client.get("/login"),
        client.get("/healthz"),
        client.get("/static/console.css"),
        client.get("/static/missing.css"),
        client.get("/"),  # 303 to the login
        client.post("/dead-letters/replay", data={"id": "dl-1"}),  # 403
        client.post("/dead-letters/replay", json={"id": "dl-1"}),  # 413
        form_login(client, password="wrong"),  # 401
    ]
    csrf = log_in(client)
    responses += [client.get(path) for path in GET_PAGES]
    responses += [
        client.get("/dead-letters/dl-404"),
        client.get("/dead-letters?reason=bogus"),
        client.post("/dead-letters/replay", data={"csrf": csrf, "id": "dl-1"}),
    ]
    for response in responses:
        assert_security_headers(response)


@pytest.mark.parametrize("path", ["/dead-letters/replay", "/dead-letters/apply", "/login"])
def test_a_form_over_256_kib_is_413(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore, path: str
) -> None:
    add(store)
    csrf = log_in(client)
    before = state(r, store)
    response = client.post(
        path,
        data={
            "csrf": csrf,
            "action": "purge",
            "scope": "one",
            "id": "dl-1",
            "pad": "x" * MAX_BODY_BYTES,
        },
    )
    assert response.status_code == 413
    assert state(r, store) == before
    # just under the limit is read (and here refused for its CSRF token only)
    small = client.post(path, data={"id": "dl-1", "pad": "x" * (MAX_BODY_BYTES - 100)})
    assert small.status_code == 403


def test_a_streamed_body_over_the_limit_is_413(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore
) -> None:
    add(store)
    csrf = log_in(client)
    before = state(r, store)
    chunks = [
        f"csrf={csrf}&id=dl-1&pad=".encode(),
        b"x" * (MAX_BODY_BYTES // 2),
        b"x" * MAX_BODY_BYTES,
    ]
    response = client.post(
        "/dead-letters/replay",
        content=iter(chunks),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert state(r, store) == before


@pytest.mark.parametrize("path", ["/dead-letters/replay", "/login", "/logout"])
@pytest.mark.parametrize("kind", ["json", "multipart", "text/plain", "none"])
def test_a_body_that_is_not_a_form_is_413(
    client: TestClient, r: fakeredis.FakeRedis, store: DeadLetterStore, path: str, kind: str
) -> None:
    add(store)
    csrf = log_in(client)
    before = state(r, store)
    form = {"csrf": csrf, "id": "dl-1"}
    if kind == "json":
        response = client.post(path, json=form)
    elif kind == "multipart":
        response = client.post(path, data=form, files={"f": ("f.txt", b"x")})
    elif kind == "text/plain":
        response = client.post(
            path, content=f"csrf={csrf}&id=dl-1", headers={"content-type": "text/plain"}
        )
    else:
        response = client.post(path)
    assert response.status_code == 413
    assert state(r, store) == before
    assert len(r.keys(SESSION_KEYS)) == 1


# --- --no-auth -------------------------------------------------------------------------


def test_no_auth_makes_every_visitor_the_local_operator(
    r: fakeredis.FakeRedis, settings: Settings, store: DeadLetterStore
) -> None:
    client = make_client(r, settings, None)
    add(store)
    response = client.get("/dead-letters")
    assert response.status_code == 200
    assert "local · operator · no login (loopback)" in response.text
    cookie, attributes = session_cookie(response)
    assert "httponly" in attributes
    [key] = r.keys(SESSION_KEYS)
    assert key == keys.web_session(digest(cookie))
    assert r.hgetall(key)["user"] == "local" and r.hgetall(key)["role"] == "operator"
    for button in OPERATOR_BUTTONS:
        assert button in response.text
    # the session is kept: one session, and its CSRF token works
    csrf = csrf_of(client.get("/").text)
    assert len(r.keys(SESSION_KEYS)) == 1
    replay = client.post("/dead-letters/replay", data={"csrf": csrf, "id": "dl-1"})
    assert flash_after(client, replay) == "replayed 1, refused 0"
    assert OperatorLog(r).recent()[0]["who"] == "local"
    # a POST still needs the token
    assert client.post("/dead-letters/replay", data={"id": "dl-1"}).status_code == 403


def test_no_auth_has_no_login(r: fakeredis.FakeRedis, settings: Settings) -> None:
    client = make_client(r, settings, None)
    response = client.get("/login?next=/brands")
    assert (response.status_code, response.headers["location"]) == (303, "/brands")
    assert client.get("/login?next=//evil.example").headers["location"] == "/"
    response = client.post("/login", data={"user": "x", "password": "y"})
    assert (response.status_code, response.headers["location"]) == (303, "/")
    assert r.keys(keys.web_login_failures("*")) == []


# --- found in review: rebinding, cross-site posts, floods, partial actions --------------


def test_no_auth_answers_only_to_a_loopback_host(r: fakeredis.FakeRedis, settings: Settings):
    """--no-auth: a page of another site whose name was rebound to 127.0.0.1 (DNS
    rebinding) gets no operator session and no page; localhost names do."""
    add(DeadLetterStore(r))
    rebound = make_client(r, settings, None, base_url="http://rebind.attacker.example:9810")
    response = rebound.get("/dead-letters")
    assert response.status_code == 421
    assert r.keys(SESSION_KEYS) == []
    assert rebound.post("/dead-letters/apply", data={"action": "purge"}).status_code == 421
    assert r.zcard(keys.DLQ_INDEX) == 1
    for base in ("http://localhost:9810", "http://127.0.0.1:9810", "http://[::1]:9810"):
        assert make_client(r, settings, None, base_url=base).get("/").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example", "X-Forwarded-Host": "console.example"},
    ],
)
def test_a_post_from_another_site_is_refused_even_with_the_token(
    client: TestClient, store: DeadLetterStore, headers: dict[str, str]
) -> None:
    entry_id = add(store)
    csrf = log_in(client)
    form = {"csrf": csrf, "action": "purge", "scope": "one", "id": entry_id, "upto": "99"}
    response = client.post("/dead-letters/apply", data=form, headers=headers)
    assert response.status_code == 403
    assert store.get(entry_id) is not None
    same = client.post(
        "/dead-letters/apply", data=form,
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1"},
    )  # fmt: skip
    assert same.status_code == 303
    assert store.get(entry_id) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "null"},  # a form posted under Referrer-Policy: no-referrer, say
        {"Origin": "http://console.example", "X-Forwarded-Host": "console.example"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://console.example"},
        {"Sec-Fetch-Site": "none"},
        {},
    ],
)
def test_a_post_of_this_site_is_let_through_to_the_token_check(
    client: TestClient, store: DeadLetterStore, headers: dict[str, str]
) -> None:
    """What says nothing (no header, Origin null) or says this site (Sec-Fetch-Site, an
    Origin naming the proxy's forwarded host) is decided by the CSRF token alone."""
    entry_id = add(store)
    csrf = log_in(client)
    form = {"action": "purge", "scope": "one", "id": entry_id, "upto": "99"}
    wrong = client.post("/dead-letters/apply", data={**form, "csrf": "x"}, headers=headers)
    assert wrong.status_code == 403
    assert store.get(entry_id) is not None
    right = client.post("/dead-letters/apply", data={**form, "csrf": csrf}, headers=headers)
    assert right.status_code == 303
    assert store.get(entry_id) is None


def test_a_login_from_another_site_is_refused(client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login", data={"csrf": token, "user": "op", "password": PASSWORD},
        headers={"Sec-Fetch-Site": "cross-site"},
    )  # fmt: skip
    assert response.status_code == 403
    assert SESSION_COOKIE not in response.cookies


def test_too_many_logins_at_once_are_refused_not_hashed(
    client: TestClient, r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each password check takes 16 MiB (scrypt): past MAX_CONCURRENT_HASHES at once a login
    is answered 503 without one."""
    console = client.app.state.console
    checked: list[str] = []
    monkeypatch.setattr(console.users, "authenticate", lambda name, pw: checked.append(name))
    console.hashing = web_app.MAX_CONCURRENT_HASHES
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"csrf": token, "user": "op", "password": "x"})
    assert response.status_code == 503
    assert checked == []
    assert r.keys(keys.web_login_failures("*")) == []
    console.hashing = 0
    monkeypatch.undo()
    assert form_login(client).status_code == 303


def test_a_failed_login_keeps_where_it_was_going(client: TestClient) -> None:
    response = form_login(client, password="wrong", next="/brands")
    assert response.status_code == 401
    assert 'name="next" value="/brands"' in response.text


def test_the_overview_refresh_does_not_keep_a_session_alive(
    client: TestClient, r: fakeredis.FakeRedis
) -> None:
    log_in(client)
    [key] = r.keys(SESSION_KEYS)
    r.expire(key, 100)
    assert client.get("/overview/live").status_code == 200
    assert r.ttl(key) <= 100  # not renewed by the refresh
    assert client.get("/").status_code == 200
    assert r.ttl(key) > 100  # renewed by a page the person asked for


def test_a_deeply_nested_payload_renders_as_text(client: TestClient, store: DeadLetterStore):
    entry_id = add(store, reason="invalid_message", payload="[" * 50_000 + "]" * 50_000)
    log_in(client)
    response = client.get(f"/dead-letters/{entry_id}")
    assert response.status_code == 200
    assert "[[[[" in response.text


@pytest.mark.parametrize("value", ["²", "٣", "1²"])
def test_unicode_digits_are_a_bad_request(client: TestClient, value: str) -> None:
    log_in(client)
    for query in (f"receipt_id={value}", f"before={value}"):
        response = client.get(f"/dead-letters?{query}")
        assert response.status_code == 400


def test_scope_one_names_exactly_one_entry(client: TestClient, store: DeadLetterStore):
    first, second = add(store, receipt_id=1), add(store, receipt_id=2)
    csrf = log_in(client)
    form = {"csrf": csrf, "action": "purge", "scope": "one", "id": [first, second], "upto": "9"}
    assert client.post("/dead-letters/apply", data=form).status_code == 400
    assert client.post("/dead-letters/confirm", data=form).status_code == 400
    assert store.get(first) is not None and store.get(second) is not None


def test_redis_failing_midway_still_logs_what_was_done(
    client: TestClient, store: DeadLetterStore, r: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    ids = [add(store, receipt_id=n) for n in (1, 2, 3)]
    csrf = log_in(client)
    console = client.app.state.console
    real = console.store.replay
    calls = []

    def replay(entry_id: str, *, stream: str) -> str | None:
        calls.append(entry_id)
        if len(calls) == 2:
            raise redis_lib.exceptions.ConnectionError("gone")
        return real(entry_id, stream=stream)

    monkeypatch.setattr(console.store, "replay", replay)
    response = client.post(
        "/dead-letters/replay", data={"csrf": csrf, "id": ids, "back": "/dead-letters"}
    )
    assert response.status_code == 303
    message = parse_qs(urlsplit(response.headers["location"]).query)["done"][0]
    assert message.startswith("replayed 1, refused 0; then Redis failed (ConnectionError)")
    [entry] = OperatorLog(r).recent()
    assert (entry["action"], entry["count"], entry["ids"]) == ("replay", 1, [ids[0]])


def test_an_operator_log_redis_refuses_is_said_on_the_page(
    client: TestClient, store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    entry_id = add(store)
    csrf = log_in(client)
    console = client.app.state.console

    def refuse(*args: object, **kwargs: object) -> None:
        raise redis_lib.exceptions.OutOfMemoryError("OOM command not allowed")

    monkeypatch.setattr(console.oplog.redis, "xadd", refuse)
    form = {"csrf": csrf, "action": "purge", "scope": "one", "id": entry_id, "upto": "9"}
    with caplog.at_level("INFO", logger="worker.oplog"):
        response = client.post("/dead-letters/apply", data=form)
    assert response.status_code == 303
    assert store.get(entry_id) is None
    message = parse_qs(urlsplit(response.headers["location"]).query)["done"][0]
    assert "purged 1 entry; the operator log could not be written to Redis" in message
    assert any("event=operator_action" in record.getMessage() for record in caplog.records)
