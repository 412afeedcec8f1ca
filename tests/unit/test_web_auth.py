"""Who may use the console (worker/web/auth.py): password hashes, the users file and its
one-line errors, sessions in Redis (lifetime, the role read from the users), the login
slow-down; `fiscal-worker web-user`, and `fiscal-worker web` refusing to start (its refusals
only: uvicorn is never started)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import types
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis as redis_lib
import uvicorn
from click.testing import CliRunner, Result
from pydantic import SecretStr
from support import Clock

from worker import keys, redis_conn
from worker.cli import cli
from worker.settings import Settings, SettingsError, get_settings
from worker.testing import clean_env
from worker.web import auth
from worker.web.app import is_loopback
from worker.web.auth import (
    FAILURE_WINDOW_SECONDS,
    FREE_FAILURES,
    LOCKOUT_MAX_SECONDS,
    SESSION_MAX_SECONDS,
    LoginThrottle,
    Sessions,
    User,
    Users,
    csrf_ok,
    hash_password,
    load_users,
    lockout_seconds,
    read_users_file,
    valid_name,
    verify_password,
)

PASSWORD = "correct horse battery"
HASH = hash_password(PASSWORD)  # once per module: scrypt costs ~50 ms a hash
USERS = Users({"op": User("op", "operator", HASH), "viewer": User("viewer", "viewer", HASH)})
VAR = "FISCAL_WEB_USERS_FILE"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Clock:
    """auth.py's clock, moved by hand (Redis' own TTLs still run on real time)."""
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(time=clock))
    return clock


# --- password hashes -------------------------------------------------------------------


def test_hash_format_and_round_trip() -> None:
    scheme, n, r, p, salt, key = HASH.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    assert PASSWORD not in HASH
    assert verify_password(PASSWORD, HASH)
    assert not verify_password(PASSWORD + " ", HASH)
    assert not verify_password("", HASH)


def test_each_hash_has_its_own_salt() -> None:
    assert hash_password(PASSWORD) != HASH


def test_the_cost_is_read_from_the_hash() -> None:
    salt = b"s" * 16
    key = hashlib.scrypt(b"pw", salt=salt, n=4, r=1, p=1, dklen=32)
    cheap = f"scrypt$4$1$1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    assert verify_password("pw", cheap)
    assert not verify_password("pW", cheap)


def test_an_empty_password_is_not_hashed() -> None:
    with pytest.raises(ValueError, match="the password is empty"):
        hash_password("")


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain-text-password",
        "bcrypt$12$abc",
        HASH.replace("scrypt$", "sha256$", 1),
        HASH + "$extra",
        HASH.rsplit("$", 1)[0],
        HASH.replace("$16384$", "$lots$"),
        HASH.replace("$16384$", "$1000$"),  # not a power of 2
        HASH.replace("$16384$", f"${2**70}$"),
        HASH.replace("$16384$", f"${2**24}$"),  # more memory than allowed
        HASH.replace("$8$1$", "$0$1$"),
        "scrypt$16384$8$1$not*base64$AAAA",
        "scrypt$16384$8$1$AAAA$not*base64",
    ],
)
def test_a_malformed_hash_never_matches_and_never_raises(encoded: str) -> None:
    assert verify_password(PASSWORD, encoded) is False


# --- users -----------------------------------------------------------------------------


def test_users_authenticate(monkeypatch: pytest.MonkeyPatch) -> None:
    op = USERS.authenticate("op", PASSWORD)
    assert op is not None and op.name == "op" and op.may_act
    viewer = USERS.get("viewer")
    assert viewer is not None and not viewer.may_act
    assert USERS.authenticate("op", "wrong") is None
    assert len(USERS) == 2
    checked: list[str] = []
    real = auth.verify_password

    def spy(password: str, encoded: str) -> bool:
        checked.append(encoded)
        return real(password, encoded)

    monkeypatch.setattr(auth, "verify_password", spy)
    # a name that is no user costs a hash too (timing tells no names), and never matches
    assert USERS.authenticate("nobody", PASSWORD) is None
    assert len(checked) == 1 and checked[0] != HASH


def test_a_user_with_a_broken_hash_cannot_log_in() -> None:
    users = Users({"x": User("x", "operator", "scrypt$16384$8$1$AAAA$AAAA")})
    assert users.authenticate("x", PASSWORD) is None


def settings_with(**values: object) -> Settings:
    return Settings(**{"web_users_file": None, "web_password": None, **values})  # type: ignore[arg-type]


def test_no_users_without_a_setting() -> None:
    assert load_users(settings_with()) is None


def test_one_operator_from_the_web_password() -> None:
    users = load_users(settings_with(web_password=SecretStr("eight-chars-pw")))
    assert users is not None and len(users) == 1
    admin = users.authenticate("admin", "eight-chars-pw")
    assert admin is not None and admin.role == "operator"
    assert "eight-chars-pw" not in admin.password_hash


def test_a_short_web_password_is_refused() -> None:
    with pytest.raises(SettingsError) as refused:
        load_users(settings_with(web_password=SecretStr("seven77")))
    assert str(refused.value) == "FISCAL_WEB_PASSWORD: must be at least 8 characters"


def test_a_file_and_a_password_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        load_users(settings_with(web_password=SecretStr("eight-chars-pw"), web_users_file=tmp_path))
    assert str(refused.value) == (
        "FISCAL_WEB_USERS_FILE and FISCAL_WEB_PASSWORD: set one, not both"
    )


def test_users_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(
        json.dumps(
            {
                "alice": {"password_hash": HASH, "role": "operator"},
                "bob": {"password_hash": HASH, "role": "viewer", "note": "ignored"},
            }
        )
    )
    users = load_users(settings_with(web_users_file=path))
    assert users is not None and len(users) == 2
    alice, bob = users.get("alice"), users.get("bob")
    assert alice is not None and alice.role == "operator"
    assert bob is not None and bob.role == "viewer"
    assert users.authenticate("bob", PASSWORD) == bob


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file: "),
        (b"{not json", "is not valid JSON (line 1)"),
        (b'{\n"a":\n', "is not valid JSON (line 3)"),
        (b"\xff\xfe{}", "cannot read "),
        (b"[]", "must be a non-empty JSON object keyed by user name"),
        (b"{}", "must be a non-empty JSON object keyed by user name"),
        (b'"alice"', "must be a non-empty JSON object keyed by user name"),
        (json.dumps({"bad\nname": {}}), "user 'bad\\nname' is not 1-64 printable characters"),
        (json.dumps({" alice": {}}), "user ' alice' is not 1-64 printable characters"),
        (json.dumps({"": {}}), "user '' is not 1-64 printable characters"),
        (json.dumps({"n" * 65: {}}), "is not 1-64 printable characters"),
        (json.dumps({"alice": "operator"}), "user 'alice': must be an object"),
        (
            json.dumps({"alice": {"password_hash": HASH}}),
            "user 'alice': role must be one of viewer, operator",
        ),
        (
            json.dumps({"alice": {"password_hash": HASH, "role": "admin"}}),
            "user 'alice': role must be one of viewer, operator",
        ),
        (
            json.dumps({"alice": {"role": "viewer"}}),
            "user 'alice': password_hash must be a scrypt hash (made with fiscal-worker web-user)",
        ),
        (
            json.dumps({"alice": {"role": "viewer", "password_hash": "hunter22"}}),
            "password_hash must be a scrypt hash",
        ),
        (
            json.dumps({"alice": {"role": "viewer", "password_hash": 42}}),
            "password_hash must be a scrypt hash",
        ),
    ],
)
def test_a_bad_users_file_is_one_line(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "users.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError) as refused:
        load_users(settings_with(web_users_file=path))
    line = one_line(str(refused.value))
    assert line.startswith(f"{VAR}: ")
    assert message in line
    assert "hunter22" not in line


def test_a_users_file_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        read_users_file(tmp_path)
    assert one_line(str(refused.value)) == f"{VAR}: cannot read {tmp_path}: IsADirectoryError"


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("alice", True),
        ("Ålice Ö", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        (" a", False),
        ("a ", False),
        ("a\tb", False),
        ("a\u202eb", False),
        (None, False),
        (7, False),
    ],
)
def test_valid_names(name: object, valid: bool) -> None:
    assert valid_name(name) is valid


# --- sessions --------------------------------------------------------------------------


@pytest.fixture
def sessions(r: fakeredis.FakeRedis, fake_time: Clock) -> Sessions:
    return Sessions(r, idle_seconds=600)


def test_a_session_is_kept_under_its_cookies_sha256(
    sessions: Sessions, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    cookie, session = sessions.create("op", "operator")
    assert len(cookie) >= 43
    key = keys.web_session(digest(cookie))
    assert session.digest == digest(cookie)
    assert r.keys("*") == [key]
    fields = r.hgetall(key)
    assert fields == {
        "user": "op",
        "role": "operator",
        "csrf": session.csrf,
        "created": repr(fake_time.now),
    }
    assert cookie not in json.dumps(fields)
    assert r.ttl(key) == 600
    assert sessions.get(cookie, USERS) == session
    assert session.may_act


def test_sessions_differ(sessions: Sessions) -> None:
    (one, first), (two, second) = (
        sessions.create("op", "operator"),
        sessions.create("op", "operator"),
    )
    assert one != two and first.csrf != second.csrf and first.digest != second.digest


def test_use_renews_the_idle_lifetime(
    sessions: Sessions, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    cookie, _ = sessions.create("op", "operator")
    key = keys.web_session(digest(cookie))
    r.expire(key, 5)
    fake_time.now += 300
    assert sessions.get(cookie, USERS) is not None
    assert r.ttl(key) == 600


def test_a_session_ends_at_its_maximum_age(
    sessions: Sessions, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    cookie, _ = sessions.create("op", "operator")
    key = keys.web_session(digest(cookie))
    fake_time.now += SESSION_MAX_SECONDS - 100  # used all along: still in
    assert sessions.get(cookie, USERS) is not None
    assert r.ttl(key) == 100  # never past its maximum age
    fake_time.now += 100
    assert sessions.get(cookie, USERS) is None
    assert not r.exists(key)


def test_the_role_is_the_users_today(sessions: Sessions, r: fakeredis.FakeRedis) -> None:
    cookie, _ = sessions.create("op", "operator")
    demoted = Users({"op": User("op", "viewer", HASH)})
    session = sessions.get(cookie, demoted)
    assert session is not None and session.role == "viewer" and not session.may_act
    key = keys.web_session(digest(cookie))
    r.hset(key, "role", "operator")  # what the session says does not matter
    assert sessions.get(cookie, demoted).role == "viewer"  # type: ignore[union-attr]
    promoted = sessions.create("viewer", "viewer")[0]
    assert sessions.get(promoted, USERS).role == "viewer"  # type: ignore[union-attr]


def test_a_user_removed_loses_their_sessions(sessions: Sessions, r: fakeredis.FakeRedis) -> None:
    cookie, _ = sessions.create("carol", "operator")
    assert sessions.get(cookie, USERS) is None
    assert r.keys("*") == []


def test_without_users_the_session_keeps_its_role(sessions: Sessions) -> None:
    cookie, _ = sessions.create("local", "operator")
    session = sessions.get(cookie, None)
    assert session is not None and (session.user, session.role) == ("local", "operator")


@pytest.mark.parametrize(
    "damage",
    [{"role": "root"}, {"csrf": ""}, {"created": "yesterday"}],
)
def test_a_damaged_session_is_dropped(
    sessions: Sessions, r: fakeredis.FakeRedis, damage: dict[str, str]
) -> None:
    cookie, _ = sessions.create("local", "operator")
    key = keys.web_session(digest(cookie))
    r.hset(key, mapping=damage)
    assert sessions.get(cookie, None) is None
    assert not r.exists(key)


@pytest.mark.parametrize("cookie", [None, "", "no-such-session", "x" * 129])
def test_no_session_for_an_unknown_cookie(
    sessions: Sessions, r: fakeredis.FakeRedis, cookie: str | None
) -> None:
    sessions.create("op", "operator")
    assert sessions.get(cookie, USERS) is None
    assert len(r.keys("*")) == 1


def test_end(sessions: Sessions, r: fakeredis.FakeRedis) -> None:
    cookie, session = sessions.create("op", "operator")
    other, _ = sessions.create("op", "operator")
    sessions.end(session)
    assert sessions.get(cookie, USERS) is None
    assert sessions.get(other, USERS) is not None


def test_csrf_ok(sessions: Sessions) -> None:
    _, session = sessions.create("op", "operator")
    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, None)
    assert not csrf_ok(session, "")
    assert not csrf_ok(session, session.csrf[:-1])
    assert not csrf_ok(session, session.csrf + "x")
    assert not csrf_ok(session, "é" + session.csrf)


# --- the login slow-down ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [
        (0, 0),
        (1, 0),
        (4, 0),
        (5, 15),
        (6, 30),
        (7, 60),
        (8, 120),
        (9, 240),
        (10, 480),
        (11, 900),
        (12, 900),
        (10**6, 900),
    ],
)
def test_lockout_seconds(failures: int, seconds: int) -> None:
    assert lockout_seconds(failures) == seconds


@pytest.fixture
def throttle(r: fakeredis.FakeRedis, fake_time: Clock) -> LoginThrottle:
    return LoginThrottle(r)


def test_five_failures_then_a_lockout_that_doubles(
    throttle: LoginThrottle, fake_time: Clock
) -> None:
    for _ in range(5):
        assert throttle.attempt("op", "10.0.0.1").wait == 0  # each counted as a failure
    assert throttle.attempt("op", "10.0.0.1").wait == 15
    fake_time.now += 14.5
    assert throttle.attempt("op", "10.0.0.1").wait == 1  # rounded up
    fake_time.now += 0.5
    assert throttle.attempt("op", "10.0.0.1").wait == 0  # the 6th
    assert throttle.attempt("op", "10.0.0.1").wait == 30
    fake_time.now += 30
    assert throttle.attempt("op", "10.0.0.1").wait == 0  # the 7th
    assert throttle.attempt("op", "10.0.0.1").wait == 60


def test_a_burst_of_attempts_is_counted_as_it_arrives(throttle: LoginThrottle) -> None:
    """Attempts are counted before their password is checked: of 50 sent at once (none
    taken back yet), only the free ones go ahead."""
    allowed = [throttle.attempt("admin", "10.0.0.1").wait == 0 for _ in range(50)]
    assert allowed.count(True) == FREE_FAILURES


def test_failures_count_per_user_and_client_and_per_client(throttle: LoginThrottle) -> None:
    for n in range(5):
        assert throttle.attempt(f"guess{n}", "10.0.0.1").wait == 0  # one client trying names
    assert throttle.attempt("op", "10.0.0.1").wait == 15  # the client is slowed, for any name
    assert throttle.attempt("op", "10.0.0.2").wait == 0  # others are not
    for _ in range(5):
        throttle.attempt("viewer", "10.0.0.3")
    # guesses from one address do not lock the user out of another one
    assert throttle.attempt("viewer", "10.0.0.9").wait == 0


def test_a_success_takes_its_attempt_back(throttle: LoginThrottle, r: fakeredis.FakeRedis) -> None:
    for _ in range(4):
        throttle.attempt("op", "10.0.0.1")
    attempt = throttle.attempt("op", "10.0.0.1")
    assert attempt.wait == 0
    throttle.take_back("op", "10.0.0.1", attempt, succeeded=True)
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    assert r.keys("*") == [client_key]  # the (user, client) count is gone
    assert r.hget(client_key, "failures") == "4"
    assert throttle.attempt("op", "10.0.0.1").wait == 0


def test_a_success_does_not_move_the_clients_lockout(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    """A client past its free failures logs in once its lockout is over: the success puts
    the count and the time of the last failure back as they were, so it is not locked out
    again from now."""
    for n in range(5):
        throttle.attempt(f"guess{n}", "10.0.0.1")
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    before = r.hgetall(client_key)
    ttl = r.ttl(client_key)
    fake_time.now += 15
    attempt = throttle.attempt("op", "10.0.0.1")
    assert attempt.wait == 0
    throttle.take_back("op", "10.0.0.1", attempt, succeeded=True)
    assert r.hgetall(client_key) == before
    assert r.ttl(client_key) >= ttl  # kept: set for the longer count
    assert throttle.attempt("viewer", "10.0.0.1").wait == 0  # no lockout from the success


def test_a_later_attempt_keeps_its_time_when_an_earlier_one_is_taken_back(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    first = throttle.attempt("op", "10.0.0.1")
    fake_time.now += 2
    second = throttle.attempt("guess", "10.0.0.1")
    throttle.take_back("op", "10.0.0.1", first, succeeded=True)
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    assert r.hgetall(client_key) == {"failures": "1", "last": second.at}


def test_an_attempt_never_checked_is_taken_back_from_both_counts(
    throttle: LoginThrottle, r: fakeredis.FakeRedis
) -> None:
    """No hashing slot: the attempt is undone, but the (user, client) failures before it
    stay (a flood cannot wipe them)."""
    for _ in range(3):
        throttle.attempt("op", "10.0.0.1")
    pair_key = keys.web_login_failures(digest("user:op\nclient:10.0.0.1"))
    before = r.hgetall(pair_key)
    attempt = throttle.attempt("op", "10.0.0.1")
    throttle.take_back("op", "10.0.0.1", attempt, succeeded=False)
    assert r.hgetall(pair_key) == before
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    assert r.hget(client_key, "failures") == "3"
    throttle.take_back("op", "10.0.0.2", throttle.attempt("op", "10.0.0.2"), succeeded=False)
    assert not r.keys(keys.web_login_failures(digest("client:10.0.0.2")))


def test_taking_back_an_attempt_whose_count_lapsed_writes_nothing(
    throttle: LoginThrottle, r: fakeredis.FakeRedis
) -> None:
    attempt = throttle.attempt("op", "10.0.0.1")
    r.flushall()  # the counts lapsed (or were evicted) meanwhile
    throttle.take_back("op", "10.0.0.1", attempt, succeeded=True)
    throttle.take_back("op", "10.0.0.1", attempt, succeeded=False)
    assert r.keys("*") == []  # no key without a lifetime, no negative count


def test_a_refused_attempt_has_nothing_to_take_back(
    throttle: LoginThrottle, r: fakeredis.FakeRedis
) -> None:
    for _ in range(5):
        throttle.attempt("op", "10.0.0.1")
    refused = throttle.attempt("op", "10.0.0.1")
    assert refused.wait > 0
    throttle.take_back("op", "10.0.0.1", refused, succeeded=True)
    assert r.hget(keys.web_login_failures(digest("client:10.0.0.1")), "failures") == "5"


def test_a_failure_stamped_by_a_clock_ahead_locks_nobody_out(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    """Replicas' clocks differ: a 'last' in the future is no lockout below the free failures,
    and past them waits no longer than a failure stamped now."""
    key = keys.web_login_failures(digest("client:10.0.0.1"))
    r.hset(key, mapping={"failures": "2", "last": repr(fake_time.now + 30)})
    assert throttle.attempt("op", "10.0.0.1").wait == 0
    r.hset(key, mapping={"failures": "5", "last": repr(fake_time.now + 300)})
    assert throttle.attempt("op", "10.0.0.1").wait == 15


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1::/56"),
        ("2001:db8:1:ff:ffff::1", "2001:db8:1::/56"),
        ("2001:db8:1:100::1", "2001:db8:1:100::/56"),
        ("fe80::1%eth0", "fe80::/56"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # mapped
        ("::ffff:0:10.0.0.1", "10.0.0.1"),  # translated (SIIT)
        ("::10.0.0.1", "10.0.0.1"),  # compatible
        ("64:ff9b::10.0.0.1", "10.0.0.1"),  # NAT64
        ("2002:a00:1:1234::1", "10.0.0.1"),  # 6to4: one IPv4 host's 65,536 /64s
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1"),  # Teredo
        ("10.0.0.1:51234", "10.0.0.1"),  # with the port some proxies add
        ("[2001:db8:1::1]:443", "2001:db8:1::/56"),
        ("[2001:db8:1::1]", "2001:db8:1::/56"),
        ("::1", "::/56"),
        ("testclient", "testclient"),
        ("?", "?"),
    ],
)
def test_a_client_is_its_ipv4_address_or_its_ipv6_56(address: str, group: str) -> None:
    assert auth.client_group(address) == group


def test_the_addresses_of_one_ipv6_56_share_their_count(throttle: LoginThrottle) -> None:
    for n in range(5):
        assert throttle.attempt("op", f"2001:db8:0:{n}::1").wait == 0
    assert throttle.attempt("op", "2001:db8:0:ff::2").wait == 15
    assert throttle.attempt("op", "2001:db8:0:100::1").wait == 0  # another /56


def test_the_last_instant_of_a_lockout_is_refused_and_takes_nothing_back(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    """Under a millisecond before a lockout ends is still a refusal (never rounded down to
    'go ahead'), and taking such an attempt back removes no failure."""
    for _ in range(5):
        throttle.attempt("op", "10.0.0.1")
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    last = float(r.hget(client_key, "last"))
    fake_time.now = last + 15 - 0.0005
    refused = [throttle.attempt("op", "10.0.0.1") for _ in range(12)]
    assert {a.wait for a in refused} == {1}
    for attempt in refused:
        throttle.take_back("op", "10.0.0.1", attempt, succeeded=False)
    assert r.hget(client_key, "failures") == "5"
    assert throttle.take_back("op", "10.0.0.1", auth.Attempt(wait=0), succeeded=False) is None
    assert r.hget(client_key, "failures") == "5"


def test_the_failure_count_lapses(throttle: LoginThrottle, r: fakeredis.FakeRedis) -> None:
    throttle.attempt("op", "10.0.0.1")
    pair_key = keys.web_login_failures(digest("user:op\nclient:10.0.0.1"))
    client_key = keys.web_login_failures(digest("client:10.0.0.1"))
    assert set(r.keys("*")) == {pair_key, client_key}
    assert r.ttl(pair_key) == FAILURE_WINDOW_SECONDS
    for _ in range(5):
        throttle.attempt("op", "10.0.0.1")
    assert r.hget(pair_key, "failures") == "5"  # the 6th was refused, not counted
    assert r.ttl(pair_key) == FAILURE_WINDOW_SECONDS + 15
    assert r.ttl(client_key) == FAILURE_WINDOW_SECONDS + 15


def test_the_lockout_is_capped(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    key = keys.web_login_failures(digest("client:x"))
    r.hset(key, mapping={"failures": "100000", "last": repr(fake_time.now)})
    assert throttle.attempt("op", "x").wait == LOCKOUT_MAX_SECONDS


def test_a_damaged_count_locks_nobody_out(
    throttle: LoginThrottle, r: fakeredis.FakeRedis, fake_time: Clock
) -> None:
    key = keys.web_login_failures(digest("user:op\nclient:10.0.0.1"))
    r.hset(key, mapping={"failures": "x", "last": "y"})
    assert throttle.attempt("op", "10.0.0.1").wait == 0


# --- `fiscal-worker web-user` ----------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[fakeredis.FakeRedis]:
    """No FISCAL_* setting of the shell; a fakeredis behind redis_client; uvicorn never
    starts."""
    for name in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(name)
    client = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: client)

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("the console would have started")

    monkeypatch.setattr(uvicorn, "run", no_server)
    get_settings.cache_clear()
    yield client
    get_settings.cache_clear()


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, prog_name="fiscal-worker")


def web_user(path: Path, name: str, *more: str, password: str | None = None) -> Result:
    if password is None:
        return run("web-user", name, "--file", str(path), *more)
    return run(
        "web-user", name, "--file", str(path), "--password-stdin", *more, input=password + "\n"
    )


def test_web_user_writes_a_hash_not_the_password(env: object, tmp_path: Path) -> None:
    path = tmp_path / "conf" / "users.json"
    result = web_user(path, "alice", "--role", "operator", password="alice-pass-1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"alice (operator) written to {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "alice-pass-1" not in text
    stored = json.loads(text)
    assert list(stored) == ["alice"] and stored["alice"]["role"] == "operator"
    assert verify_password("alice-pass-1", stored["alice"]["password_hash"])
    assert [p.name for p in path.parent.iterdir()] == ["users.json"]  # no temporary left
    users = load_users(settings_with(web_users_file=path))
    assert users is not None and users.authenticate("alice", "alice-pass-1") is not None


def test_web_user_adds_changes_and_removes(env: object, tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    assert web_user(path, "alice", "--role", "operator", password="alice-pass-1").exit_code == 0
    result = web_user(path, "bob", password="bob-pass-12")
    assert result.exit_code == 0 and "bob (viewer)" in result.stdout  # viewer unless told
    first = json.loads(path.read_text())["alice"]["password_hash"]
    assert web_user(path, "alice", "--role", "viewer", password="alice-pass-2").exit_code == 0
    stored = json.loads(path.read_text())
    assert {name: user["role"] for name, user in stored.items()} == {
        "alice": "viewer",
        "bob": "viewer",
    }
    assert stored["alice"]["password_hash"] != first
    assert verify_password("alice-pass-2", stored["alice"]["password_hash"])
    result = web_user(path, "bob", "--delete")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"removed bob from {path}\n"
    assert list(json.loads(path.read_text())) == ["alice"]


def test_web_user_refuses_to_remove_the_last_or_an_unknown_user(
    env: object, tmp_path: Path
) -> None:
    path = tmp_path / "users.json"
    assert web_user(path, "alice", password="alice-pass-1").exit_code == 0
    before = path.read_text()
    result = web_user(path, "zed", "--delete")
    assert result.exit_code == 1
    assert one_line(result.stderr) == f"error: no user zed in {path}"
    result = web_user(path, "alice", "--delete")
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        "error: refusing to remove the last user (the console would not start)"
    )
    assert path.read_text() == before


def test_web_user_refuses_a_short_password(env: object, tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    result = web_user(path, "alice", password="seven77")
    assert result.exit_code == 1
    assert one_line(result.stderr) == "error: the password must be at least 8 characters"
    assert not path.exists()


@pytest.mark.parametrize("name", ["a" * 65, " alice", "alice ", "al\x1bice", ""])
def test_web_user_refuses_a_bad_name(env: object, tmp_path: Path, name: str) -> None:
    path = tmp_path / "users.json"
    result = web_user(path, name, password="long-enough-1")
    assert result.exit_code == 2
    assert "1-64 printable characters" in result.stderr
    assert not path.exists()


def test_web_user_prompts_twice(env: object, tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    result = run(
        "web-user",
        "alice",
        "--file",
        str(path),
        input="first-try-1\nsecond-try-2\nthird-try-33\nthird-try-33\n",
    )
    assert result.exit_code == 0, result.output
    assert "do not match" in result.output
    assert "third-try-33" not in result.output
    hashed = json.loads(path.read_text())["alice"]["password_hash"]
    assert verify_password("third-try-33", hashed)


def test_web_user_on_a_broken_file_is_one_line(env: object, tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text('{"alice": {"role": "boss", "password_hash": "scrypt$x"}}')
    result = web_user(path, "bob", password="bob-pass-12")
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        f"error: {VAR}: user 'alice': role must be one of viewer, operator"
    )
    assert "boss" in path.read_text()  # left as it was


# --- `fiscal-worker web`: the refusals ---------------------------------------------------


ALL_INTERFACES = ".".join(["0"] * 4)


def test_web_refuses_to_start_without_credentials(env: object) -> None:
    result = run("web")
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith("error: the console needs credentials: set FISCAL_WEB_USERS_FILE")
    assert "--no-auth with a loopback --host" in line


@pytest.mark.parametrize(
    "host", [ALL_INTERFACES, "::", "192.168.1.5", "console.example.com", "localhost.", ""]
)
def test_web_no_auth_refuses_a_host_off_loopback(env: object, host: str) -> None:
    result = run("web", "--no-auth", "--host", host)
    assert result.exit_code == 2
    assert one_line(result.stderr) == (
        f"error: --no-auth binds to loopback only (127.0.0.1, ::1), not {host}"
    )


def test_web_no_auth_refuses_credentials_too(env: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISCAL_WEB_PASSWORD", "the-admin-pw-1")
    result = run("web", "--no-auth")
    assert result.exit_code == 2
    assert one_line(result.stderr) == (
        "error: --no-auth with FISCAL_WEB_USERS_FILE or FISCAL_WEB_PASSWORD set"
    )
    assert "the-admin-pw-1" not in result.output


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"FISCAL_WEB_PASSWORD": "tiny7pw"}, "error: FISCAL_WEB_PASSWORD: must be at least 8"),
        (
            {"FISCAL_WEB_USERS_FILE": "/nonexistent/users.json"},
            "error: FISCAL_WEB_USERS_FILE: no such file: /nonexistent/users.json",
        ),
        (
            {
                "FISCAL_WEB_USERS_FILE": "/nonexistent/users.json",
                "FISCAL_WEB_PASSWORD": "tiny7pw-but-long",
            },
            "error: FISCAL_WEB_USERS_FILE and FISCAL_WEB_PASSWORD: set one, not both",
        ),
        ({"FISCAL_WEB_SESSION_SECONDS": "5"}, "error: FISCAL_WEB_SESSION_SECONDS: "),
    ],
)
def test_web_refuses_bad_credentials_in_one_line(
    env: object, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    for args in ((), ("--no-auth",)):
        result = run("web", *args)
        assert result.exit_code == 1
        assert one_line(result.stderr).startswith(message)
        assert "tiny7pw" not in result.output


def test_web_refuses_a_bad_port(env: object) -> None:
    assert run("web", "--port", "0").exit_code == 2
    assert run("web", "--port", "65536").exit_code == 2


def test_web_does_not_listen_when_redis_is_unreachable(
    env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = fakeredis.FakeRedis(decode_responses=True)

    def unreachable() -> None:
        raise redis_lib.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(broken, "ping", unreachable)
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: broken)
    monkeypatch.setenv("FISCAL_WEB_PASSWORD", "the-admin-pw-1")
    result = run("web")
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: ")
    assert "the-admin-pw-1" not in result.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        (ALL_INTERFACES, False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
