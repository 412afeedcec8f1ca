"""The console's Starlette app: routes, the login, roles and CSRF, the security headers.

Every page needs a session (`/login`), except `/healthz` and the static files. A viewer reads;
an operator may also replay and purge (a viewer's POST is refused with 403). Every POST
carries the session's CSRF token in its form (`csrf`), else 403. Replays go through
`DeadLetterStore.replay`, the same idempotent path as `fiscal-worker dlq replay`; every
replay and purge is written to the operator log (worker/oplog.py). Bulk actions and purges
go through a confirmation that names the count; the action then touches only the entries
that were in the store when it was confirmed (`upto`, the newest seq then).

Pages are rendered on the server (Jinja2, autoescaped); the one script (static/console.js)
refreshes the overview and selects rows. The Content-Security-Policy allows nothing else.
Redis is called from a thread (redis-py is blocking), never on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker.dlq import REASONS, DeadLetterStore, Replayed, Selection
from worker.ingest_format import BRAND_PATTERN
from worker.logs import kv
from worker.oplog import OperatorLog
from worker.settings import Settings
from worker.web import data
from worker.web.auth import (
    FAILURE_DELAY_SECONDS,
    MAX_CONCURRENT_HASHES,
    NO_AUTH_USER,
    LoginThrottle,
    Session,
    Sessions,
    Users,
    csrf_ok,
    valid_name,
)
from worker.web.render import payload_view, printable

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "fw_session"
LOGIN_COOKIE = "fw_login"  # the login form's CSRF value (double submit: cookie = field)
PAGE_SIZE = 50
MAX_BODY_BYTES = 256 * 1024  # a form larger than this is refused (413)
MAX_SELECTED = 500  # ids one "selected" action may name
REFRESH_SECONDS = 5  # the overview reloads its numbers this often
LIVE_PATH = "/overview/live"  # the overview's refresh (static/console.js)
UNKNOWN_BRAND = "(unknown)"  # the brand filter's value for messages without a readable brand

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    """403 with this one-line reason."""


class BadRequest(Exception):
    """400 with this one-line reason."""


class Console:
    """The app's state: settings, Redis, users (None: --no-auth), the template engine."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, users: Users | None):
        self.settings = settings
        self.redis = redis_client
        self.users = users
        self.sessions = Sessions(redis_client, idle_seconds=settings.web_session_seconds)
        self.throttle = LoginThrottle(redis_client)
        self.hashing = 0  # logins checking a password now (the event loop's count)
        self.store = DeadLetterStore(
            redis_client,
            warn_entries=settings.dlq_warn_entries,
            warn_bytes=settings.dlq_warn_bytes,
        )
        self.oplog = OperatorLog(redis_client)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_finalize,
        )
        self.templates.filters.update(
            printable=printable,
            ago=_ago_text,
            seconds=_seconds_text,
            number=_number_text,
            utc=_utc_text,
        )
        # a brand a link may carry: a valid one (a dead letter keeps any string it was sent)
        self.templates.tests["linkable"] = lambda value: (
            isinstance(value, str) and bool(BRAND_PATTERN.fullmatch(value))
        )

    def render(
        self, request: Request, template: str, session: Session | None, status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:  # fmt: skip
        html = self.templates.get_template(template).render(
            session=session,
            no_auth=self.users is None,
            path=request.url.path,
            reasons=REASONS,
            refresh_seconds=REFRESH_SECONDS,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)


Handler = Callable[[Console, Request, Session, dict[str, list[str]]], Response]


def create_app(
    settings: Settings, redis_client: redis.Redis, users: Users | None
) -> _SecurityHeaders:
    """The console. `users` None means --no-auth: everyone is the operator `local` (the
    caller makes sure it binds to loopback only)."""
    console = Console(settings, redis_client, users)
    app = Starlette(
        routes=[
            Route("/healthz", _healthz),
            Route("/login", _login_page, methods=["GET"]),
            Route("/login", _login, methods=["POST"]),
            Route("/logout", _page(_logout, act=False), methods=["POST"]),
            Route("/", _page(_overview_page)),
            Route(LIVE_PATH, _page(_overview_live)),
            Route("/dead-letters", _page(_dead_letters)),
            Route("/dead-letters/replay", _page(_replay_selected, act=True), methods=["POST"]),
            Route("/dead-letters/confirm", _page(_confirm, act=True), methods=["POST"]),
            Route("/dead-letters/apply", _page(_apply, act=True), methods=["POST"]),
            Route("/dead-letters/{entry_id}", _page(_entry)),
            Route("/dead-letters/{entry_id}/payload", _page(_payload)),
            Route("/receipts", _page(_receipt)),
            Route("/brands", _page(_brands)),
            Route("/log", _page(_oplog)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
    )
    app.state.console = console
    return _SecurityHeaders(app)


class _SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every HTTP response (the static files too)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.console.users is None and not _loopback_host(scope):
            # --no-auth: a page of another site that rebinds its name to 127.0.0.1 would
            # otherwise be an operator here; only a loopback name is answered
            response = PlainTextResponse(
                "this console runs without a login: it answers only to localhost",
                status_code=421,
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name.lower().encode(), value.encode())
                         for name, value in SECURITY_HEADERS.items()
                         if name.lower().encode() not in present]  # fmt: skip
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- the frame: sessions, roles, CSRF, errors ------------------------------------------


def _page(handler: Handler, *, act: bool | None = None) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a view: it needs a session; a POST needs the CSRF token, and `act` (replay,
    purge) the operator role. The view runs in a thread with the parsed form."""

    async def endpoint(request: Request) -> Response:
        console: Console = request.app.state.console
        form = await _form(request) if request.method == "POST" else {}
        if form is None:
            return PlainTextResponse("form too large or not a form", status_code=413)
        session: Session | None = None
        cookie: str | None = None
        try:
            session, cookie = await run_in_threadpool(_session_of, console, request)
            if session is None:
                if request.method != "GET":
                    return PlainTextResponse("not logged in", status_code=403)
                return RedirectResponse(_login_url(request), status_code=303)
            if request.method == "POST" and _cross_site(request):
                raise Forbidden("a request from another site is refused")
            if request.method == "POST" and not csrf_ok(session, _one(form, "csrf")):
                raise Forbidden("missing or wrong CSRF token; reload the page and try again")
            if act and not session.may_act:
                raise Forbidden(f"{session.user} is a viewer: replay and purge need an operator")
            response = await run_in_threadpool(handler, console, request, session, form)
        except Forbidden as exc:
            response = console.render(
                request, "error.html", session, status_code=403, title="Forbidden",
                message=str(exc),
            )  # fmt: skip
        except BadRequest as exc:
            response = console.render(
                request, "error.html", session, status_code=400, title="Bad request",
                message=str(exc),
            )  # fmt: skip
        except redis.exceptions.RedisError as exc:
            log.warning(kv("web_redis_error", error=exc.__class__.__name__))
            return PlainTextResponse(_redis_trouble(exc), status_code=503)
        if cookie is not None:
            _set_session_cookie(request, response, cookie)
        return response

    return endpoint


def _session_of(console: Console, request: Request) -> tuple[Session | None, str | None]:
    """(the request's session, a new cookie to set or None). Under --no-auth a visitor
    without a session gets one as the operator `local`. The overview's own refresh does not
    count as use: an unattended tab still ends its session when it is idle long enough."""
    session = console.sessions.get(
        request.cookies.get(SESSION_COOKIE), console.users,
        renew=request.url.path != LIVE_PATH,
    )  # fmt: skip
    if session is not None or console.users is not None:
        return session, None
    cookie, session = console.sessions.create(NO_AUTH_USER, "operator")
    return session, cookie


async def _form(request: Request) -> dict[str, list[str]] | None:
    """An urlencoded form (None: too large or another content type)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        return None


def _one(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _set_session_cookie(request: Request, response: Response, cookie: str) -> None:
    console: Console = request.app.state.console
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(console.settings.web_session_seconds),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _login_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/login?" + urlencode({"next": target})


def _safe_next(target: str | None) -> str:
    """Only a path of this site: `/x`, never `//host` or `/\\host` or a scheme."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target if target.isprintable() else "/"


# --- health and login ------------------------------------------------------------------


async def _healthz(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        await run_in_threadpool(console.redis.ping)
    except redis.exceptions.RedisError:
        return PlainTextResponse("redis unavailable", status_code=503)
    return PlainTextResponse("ok")


async def _login_page(request: Request) -> Response:
    console: Console = request.app.state.console
    if console.users is None:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return _login_form(request, console, error=None, status_code=200)


def _login_form(
    request: Request, console: Console, *, error: str | None, status_code: int, name: str = "",
    next_path: str | None = None,
) -> Response:  # fmt: skip
    token = secrets.token_urlsafe(24)
    target = next_path if next_path is not None else request.query_params.get("next")
    response = console.render(
        request, "login.html", None, status_code=status_code, error=error, login_csrf=token,
        next=_safe_next(target), name=name,
    )  # fmt: skip
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/login",
    )  # fmt: skip
    return response


async def _login(request: Request) -> Response:
    console: Console = request.app.state.console
    if console.users is None:
        return RedirectResponse("/", status_code=303)
    if _cross_site(request):
        return PlainTextResponse("a login from another site is refused", status_code=403)
    form = await _form(request)
    if form is None:
        return PlainTextResponse("form too large or not a form", status_code=413)
    next_path = _one(form, "next")
    sent, expected = _one(form, "csrf") or "", request.cookies.get(LOGIN_COOKIE) or ""
    if not sent or not expected or not _same(sent, expected):
        return _login_form(
            request, console, error="The form expired; please try again.", status_code=403,
            next_path=next_path,
        )  # fmt: skip
    name, password = (_one(form, "user") or "").strip(), _one(form, "password") or ""
    client = request.client.host if request.client else "?"
    user = None
    try:
        attempt = await run_in_threadpool(console.throttle.attempt, name, client)
        if attempt.wait == 0 and valid_name(name) and password:
            if console.hashing >= MAX_CONCURRENT_HASHES:  # not checked: not counted
                await run_in_threadpool(
                    console.throttle.take_back, name, client, attempt, succeeded=False
                )
                log.warning(kv("web_login_busy", client=client))
                return PlainTextResponse("too many logins at once; try again", status_code=503)
            console.hashing += 1  # the event loop's own count: no lock needed
            try:
                user = await run_in_threadpool(console.users.authenticate, name, password)
            finally:
                console.hashing -= 1
        if user is not None:
            await run_in_threadpool(
                console.throttle.take_back, name, client, attempt, succeeded=True
            )
            cookie, _ = await run_in_threadpool(console.sessions.create, user.name, user.role)
    except redis.exceptions.RedisError as exc:
        return PlainTextResponse(_redis_trouble(exc), status_code=503)
    wait = attempt.wait
    if wait > 0:
        log.warning(kv("web_login_refused", user=printable(name)[:64], wait=wait))
        return _login_form(
            request, console, status_code=429, name=name, next_path=next_path,
            error=f"Too many failed logins: try again in {wait} s.",
        )  # fmt: skip
    if user is None:
        log.warning(kv("web_login_failed", user=printable(name)[:64], client=client))
        await asyncio.sleep(FAILURE_DELAY_SECONDS)
        return _login_form(
            request, console, status_code=401, name=name, next_path=next_path,
            error="Wrong user name or password.",
        )  # fmt: skip
    log.info(kv("web_login", user=user.name, role=user.role, client=client))
    response = RedirectResponse(_safe_next(next_path), status_code=303)
    _set_session_cookie(request, response, cookie)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


def _redis_trouble(exc: redis.exceptions.RedisError) -> str:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return (
            "Redis is at its memory limit (OutOfMemoryError) and refuses writes: a new login "
            "cannot be recorded. Use a session already open, or fiscal-worker dlq purge."
        )
    return f"Redis is unavailable ({exc.__class__.__name__}); try again"


def _cross_site(request: Request) -> bool:
    """Whether a state-changing request came from another site (a second line behind the
    CSRF token and SameSite=Strict). Sec-Fetch-Site decides where the browser sends it;
    else an Origin naming neither the Host nor the X-Forwarded-Host (a proxy may rewrite
    Host). `Origin: null` (a form posted under `Referrer-Policy: no-referrer`, say) or none
    says nothing: the token decides."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    return urlsplit(origin).netloc not in hosts - {""}


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _logout(console: Console, request: Request, session: Session, form: Any) -> Response:
    console.sessions.end(session)
    response = RedirectResponse("/login" if console.users else "/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- pages -----------------------------------------------------------------------------


def _overview_page(console: Console, request: Request, session: Session, form: Any) -> Response:
    view = data.overview(console.redis, console.settings)
    return console.render(request, "overview.html", session, view=view)


def _overview_live(console: Console, request: Request, session: Session, form: Any) -> Response:
    view = data.overview(console.redis, console.settings)
    return console.render(request, "_overview.html", session, view=view)


def _brands(console: Console, request: Request, session: Session, form: Any) -> Response:
    rows = data.brands(console.redis, console.settings)
    return console.render(request, "brands.html", session, brands=rows)


def _oplog(console: Console, request: Request, session: Session, form: Any) -> Response:
    return console.render(request, "log.html", session, entries=console.oplog.recent(200))


def _dead_letters(console: Console, request: Request, session: Session, form: Any) -> Response:
    params = request.query_params
    error = None
    try:
        selection, filters = _selection(params.get)
        before = _positive_int(params.get("before"), "before")
    except BadRequest as exc:
        selection, filters, before, error = None, _raw_filters(params.get), None, str(exc)
    page = (
        console.store.page(selection, before=before, limit=PAGE_SIZE)
        if selection is not None
        else None
    )
    stats = console.store.stats()
    return console.render(
        request, "dead_letters.html", session, status_code=400 if error else 200,
        page=page, filters=filters, error=error, stats=stats,
        query=urlencode({k: v for k, v in filters.items() if v}),
        brands=[UNKNOWN_BRAND if b == "" else b for b in stats["by_brand"]],
        upto=console.store.newest_seq(), flash=_flash(request),
        unknown_brand=UNKNOWN_BRAND,
    )  # fmt: skip


def _entry(console: Console, request: Request, session: Session, form: Any) -> Response:
    entry_id = request.path_params["entry_id"]
    entry = console.store.get(entry_id)
    if entry is None:
        return console.render(
            request, "error.html", session, status_code=404, title="Not found",
            message=f"no dead-letter entry {printable(entry_id)[:80]} (replayed or purged?)",
        )  # fmt: skip
    return console.render(
        request, "entry.html", session, entry=entry, payload=payload_view(entry),
        result=json.dumps(entry.get("result"), indent=2, ensure_ascii=True, sort_keys=True)
        if entry.get("result") is not None else None,
        upto=console.store.newest_seq(), flash=_flash(request),
    )  # fmt: skip


def _payload(console: Console, request: Request, session: Session, form: Any) -> Response:
    """The whole payload as kept, as a download (text/plain, never rendered)."""
    entry = console.store.get(request.path_params["entry_id"])
    if entry is None:
        return PlainTextResponse("no such entry", status_code=404)
    return PlainTextResponse(
        str(entry.get("payload", "")),
        headers={"Content-Disposition": f'attachment; filename="{entry["id"]}-payload.txt"'},
    )


def _receipt(console: Console, request: Request, session: Session, form: Any) -> Response:
    brand = (request.query_params.get("brand") or "").strip()
    raw_id = (request.query_params.get("receipt_id") or "").strip()
    if not brand and not raw_id:
        return console.render(request, "receipt.html", session, brand="", receipt_id="", view=None)
    if not BRAND_PATTERN.fullmatch(brand):
        raise BadRequest("brand: 1-64 characters of A-Za-z0-9_.-")
    receipt_id = _positive_int(raw_id, "receipt id")
    if receipt_id is None:
        raise BadRequest("receipt id: a whole number >= 1")
    view = data.receipt(console.redis, console.settings, brand, receipt_id)
    return console.render(
        request, "receipt.html", session, brand=brand, receipt_id=receipt_id, view=view
    )


# --- actions ---------------------------------------------------------------------------


def _replay_selected(console: Console, request: Request, session: Session, form: Any) -> Response:
    """Replay the ticked entries at once (a replay is idempotent: no confirmation)."""
    ids = _ids(form)
    message, _ = _act(console, session, "replay", {"ids": len(ids)}, ids)
    return _back(form, message)


def _confirm(console: Console, request: Request, session: Session, form: Any) -> Response:
    """The confirmation of a purge, or of a replay of everything matching a filter: it
    names the count, and fences the action to the entries there now (`upto`)."""
    action, scope = _action(form)
    upto = console.store.newest_seq()
    ids: list[str] = []
    filters: dict[str, str] = {}
    if scope == "matching":
        selection, filters = _selection(lambda name: _one(form, name))
        count = console.store.count_selected(selection, upto=upto)
    else:
        ids = _ids(form, one=scope == "one")
        count = sum(1 for head in console.store.heads(ids) if head is not None)
    return console.render(
        request, "confirm.html", session, action=action, scope=scope, ids=ids, filters=filters,
        count=count, upto=upto, back=_safe_next(_one(form, "back")),
    )  # fmt: skip


def _apply(console: Console, request: Request, session: Session, form: Any) -> Response:
    action, scope = _action(form)
    upto = _positive_int(_one(form, "upto"), "upto") or 0
    if scope == "matching":
        selection, filters = _selection(lambda name: _one(form, name))
        chosen: Any = console.store.selected_ids(selection, upto=upto)
        described: dict[str, Any] = {"filter": {k: v for k, v in filters.items() if v} or "all"}
    else:
        ids = _ids(form, one=scope == "one")
        chosen, described = ids, ({"id": ids[0]} if scope == "one" else {"ids": len(ids)})
    message, refused = _act(console, session, action, described, chosen)
    if scope == "one" and refused:  # it stays: back to its page, which says why
        return _back({"back": [f"/dead-letters/{ids[0]}"]}, message)
    return _back({"back": [_one(form, "back") or "/dead-letters"]}, message)


def _action(form: dict[str, list[str]]) -> tuple[str, str]:
    action, scope = _one(form, "action"), _one(form, "scope")
    if action not in ("replay", "purge") or scope not in ("selected", "matching", "one"):
        raise BadRequest("unknown action")
    return action, scope


def _act(
    console: Console, session: Session, action: str, described: dict[str, Any], chosen: Any
) -> tuple[str, bool]:
    """Replay or purge `chosen`, and write the operator log with what was done, even when
    Redis fails midway; returns the message for the page and whether any was refused."""
    outcome = Replayed([], [])
    failure: redis.exceptions.RedisError | None = None
    try:
        if action == "replay":
            console.store.replay_many(chosen, stream=console.settings.ingest_stream, into=outcome)
        else:
            removed: list[str] = []
            try:
                console.store.remove_many(chosen, into=removed)
            finally:
                outcome.replayed.extend({"id": entry_id} for entry_id in removed)
    except redis.exceptions.RedisError as exc:
        failure = exc
    done, refused = outcome.replayed, outcome.refused
    if action == "replay":
        message = f"replayed {len(done)}, refused {len(refused)}"
        if refused:
            message += f" (first refusal: {refused[0]['error'][:200]})"
    else:
        message = f"purged {len(done)} entr{'y' if len(done) == 1 else 'ies'}"
    if failure is not None:
        message += f"; then Redis failed ({failure.__class__.__name__}): the rest was not done"
    try:
        console.oplog.record(
            who=session.user, via="web", action=action, selection=described, count=len(done),
            refused=len(refused), ids=[item["id"] for item in done],
        )  # fmt: skip
    except redis.exceptions.RedisError as exc:
        message += (
            f"; the operator log could not be written to Redis ({exc.__class__.__name__}): "
            "the console's log output has it"
        )
    return message, bool(refused)


def _back(form: dict[str, list[str]], message: str) -> Response:
    target = _safe_next(_one(form, "back") or "/dead-letters")
    glue = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{glue}{urlencode({'done': message})}", status_code=303)


def _flash(request: Request) -> str | None:
    done = request.query_params.get("done")
    return printable(done)[:400] if done else None


def _ids(form: dict[str, list[str]], *, one: bool = False) -> list[str]:
    ids = list(dict.fromkeys(form.get("id", [])))
    if not ids:
        raise BadRequest("no entry selected")
    if one and len(ids) != 1:
        raise BadRequest("one entry, not several")
    if len(ids) > MAX_SELECTED:
        raise BadRequest(f"at most {MAX_SELECTED} entries at once; use 'all matching'")
    return ids


# --- filters ---------------------------------------------------------------------------


FILTER_NAMES = ("reason", "brand", "receipt_id", "since", "until")


def _raw_filters(get: Callable[[str], str | None]) -> dict[str, str]:
    return {name: (get(name) or "").strip() for name in FILTER_NAMES}


def _selection(get: Callable[[str], str | None]) -> tuple[Selection, dict[str, str]]:
    """The dead-letter filter of a query or form: (Selection, the raw values to echo)."""
    raw = _raw_filters(get)
    reason = raw["reason"] or None
    if reason is not None and reason not in REASONS:
        raise BadRequest(f"reason: one of {', '.join(REASONS)}")
    brand: str | None = raw["brand"] or None
    if brand == UNKNOWN_BRAND:
        brand = ""
    elif brand is not None and not BRAND_PATTERN.fullmatch(brand):
        raise BadRequest("brand: 1-64 characters of A-Za-z0-9_.-")
    receipt_id = _positive_int(raw["receipt_id"], "receipt id")
    since, until = _time(raw["since"], "from"), _time(raw["until"], "to")
    if since and until and since >= until:
        raise BadRequest("the time range is empty: 'from' must be before 'to'")
    selection = Selection(
        reason=reason, brand=brand, receipt_id=receipt_id, since=since, until=until
    )
    return selection, raw


def _positive_int(value: str | None, what: str) -> int | None:
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) < 1:
        raise BadRequest(f"{what}: a whole number >= 1")
    return int(text)


def _time(value: str, what: str) -> datetime | None:
    """A time of the filter: RFC 3339, or a browser's datetime-local (taken as UTC)."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{what}: a time like 2026-12-01T10:30 (UTC)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- template filters ------------------------------------------------------------------


def _finalize(value: Any) -> Any:
    """Every value a template prints: None as '-', text with its unprintable characters
    escaped (autoescaping then handles HTML)."""
    if value is None:
        return "-"
    if isinstance(value, Markup):
        return value
    return printable(value) if isinstance(value, str) else value


def _ago_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return _seconds_text(seconds) + " ago"


def _seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _utc_text(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number_text(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _loopback_host(scope: Any) -> bool:
    """Whether the request's Host names this machine's loopback (any port)."""
    host = ""
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1")
            break
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name.lower() in ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the console on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
