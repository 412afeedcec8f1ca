"""Who may use the console: users and roles, password hashes, sessions, the login slow-down.

Users come from `FISCAL_WEB_USERS_FILE`, a JSON object

    {"alice": {"password_hash": "scrypt$16384$8$1$<salt>$<key>", "role": "operator"},
     "bob":   {"password_hash": "scrypt$...", "role": "viewer"}}

written by `fiscal-worker web-user` (hashes only: the file holds no password), or from
`FISCAL_WEB_PASSWORD`, one password for a single operator named `admin`. Roles: `viewer`
reads every page; `operator` may also replay and purge.

A session is a random cookie value; Redis keeps its SHA-256 (never the value) with the
user, the CSRF token and when it began, and forgets it after `web_session_seconds` unused
or SESSION_MAX_SECONDS after it began. A user's role is read from the users at every
request, so a user removed from the file loses their sessions at the console's restart.

Failed logins are counted per (user name, client address) and per client address; past
FREE_FAILURES in a row, each further attempt waits a lockout that doubles up to
LOCKOUT_MAX_SECONDS. At most MAX_CONCURRENT_HASHES passwords are checked at once per process
(scrypt takes 16 MiB each): a flood of logins is refused, not let run the console out of
memory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker import keys, scripts
from worker.settings import ENV_PREFIX, Settings, SettingsError

if TYPE_CHECKING:
    from redis import Redis

ROLES = ("viewer", "operator")
SINGLE_USER = "admin"  # the user of FISCAL_WEB_PASSWORD
NO_AUTH_USER = "local"  # who acts under --no-auth (an operator, on loopback only)
SESSION_MAX_SECONDS = 24 * 3600  # a session ends this long after login, used or not
FREE_FAILURES = 5  # failed logins in a row before the lockout starts
FAILURE_WINDOW_SECONDS = 900  # a run of failures is forgotten this long after its lockout
LOCKOUT_BASE_SECONDS = 15  # the first lockout; doubled with each further failure
LOCKOUT_MAX_SECONDS = 900
FAILURE_DELAY_SECONDS = 1.0  # every failed login is answered this late
MAX_CONCURRENT_HASHES = 4  # password checks at once per console process
MAX_NAME_CHARS = 64
IPV6_CLIENT_PREFIX = 56  # an IPv6 client is its /56: one customer's usual delegation

# scrypt's cost: 16 MiB and ~50 ms per hash here, the RFC 7914 interactive setting.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES = 2**14, 8, 1, 32


# --- password hashes -------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$<salt>$<key>` (base64), for the users file."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the hash; False for a malformed hash, never an error."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=SCRYPT_KEY_BYTES,
        maxmem=256 * 1024 * 1024,
    )  # fmt: skip


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# --- users -----------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


class Users:
    """The console's users by name; `authenticate` checks a password in constant time."""

    def __init__(self, users: dict[str, User]) -> None:
        self._users = users
        # a name that is not a user still costs one hash, so timing does not tell names
        self._dummy = hash_password(secrets.token_urlsafe(16))

    def __len__(self) -> int:
        return len(self._users)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        user = self._users.get(name)
        ok = verify_password(password, user.password_hash if user else self._dummy)
        return user if ok and user is not None else None


def load_users(settings: Settings) -> Users | None:
    """The users of FISCAL_WEB_USERS_FILE or FISCAL_WEB_PASSWORD; None when neither is set.

    Raises SettingsError (one line naming the variable) for a bad file, or both set.
    """
    if settings.web_users_file is not None and settings.web_password is not None:
        raise SettingsError(
            f"{ENV_PREFIX}WEB_USERS_FILE and {ENV_PREFIX}WEB_PASSWORD: set one, not both"
        )
    if settings.web_password is not None:
        password = settings.web_password.get_secret_value()
        if len(password) < 8:
            raise SettingsError(f"{ENV_PREFIX}WEB_PASSWORD: must be at least 8 characters")
        return Users({SINGLE_USER: User(SINGLE_USER, "operator", hash_password(password))})
    if settings.web_users_file is None:
        return None
    return Users(read_users_file(settings.web_users_file))


def read_users_file(path: Path) -> dict[str, User]:
    var = f"{ENV_PREFIX}WEB_USERS_FILE"
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{var}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{var}: cannot read {path}: {exc.__class__.__name__}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{var}: {path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise SettingsError(f"{var}: {path} must be a non-empty JSON object keyed by user name")
    users: dict[str, User] = {}
    for name, entry in raw.items():
        if not valid_name(name):
            raise SettingsError(f"{var}: user {name[:70]!r} is not 1-64 printable characters")
        if not isinstance(entry, dict):
            raise SettingsError(f"{var}: user {name!r}: must be an object")
        role, password_hash = entry.get("role"), entry.get("password_hash")
        if role not in ROLES:
            raise SettingsError(f"{var}: user {name!r}: role must be one of {', '.join(ROLES)}")
        if not isinstance(password_hash, str) or not password_hash.startswith("scrypt$"):
            raise SettingsError(
                f"{var}: user {name!r}: password_hash must be a scrypt hash "
                "(made with fiscal-worker web-user)"
            )
        users[name] = User(name, role, password_hash)
    return users


def valid_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_CHARS
        and name.isprintable()
        and name == name.strip()
    )


# --- sessions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str
    digest: str  # the key's suffix: SHA-256 of the cookie

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


class Sessions:
    def __init__(self, redis_client: Redis, *, idle_seconds: float) -> None:
        self.redis = redis_client
        self.idle_seconds = idle_seconds

    def create(self, user: str, role: str) -> tuple[str, Session]:
        """A new session: (the cookie value, the session)."""
        cookie = secrets.token_urlsafe(32)
        session = Session(user, role, secrets.token_urlsafe(32), _digest(cookie))
        key = keys.web_session(session.digest)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"user": user, "role": role, "csrf": session.csrf,
                                    "created": repr(time.time())})  # fmt: skip
            pipe.expire(key, self._ttl(time.time()))
            pipe.execute()
        return cookie, session

    def get(self, cookie: str | None, users: Users | None, *, renew: bool = True) -> Session | None:
        """The session of this cookie, still valid, its idle lifetime renewed (unless not
        `renew`); else None. The role is the user's today (`users`; None: --no-auth, the
        session's own)."""
        if not cookie or len(cookie) > 128:
            return None
        digest = _digest(cookie)
        key = keys.web_session(digest)
        fields = self.redis.hgetall(key)
        if not fields:
            return None
        try:
            created = float(fields.get("created", ""))
        except ValueError:
            created = 0.0
        user_name, role = fields.get("user", ""), fields.get("role", "")
        if users is not None:
            user = users.get(user_name)
            role = user.role if user is not None else ""
        ttl = self._ttl(created)
        if role not in ROLES or ttl <= 0 or not fields.get("csrf"):
            self.redis.delete(key)
            return None
        if renew:
            self.redis.expire(key, ttl)
        return Session(user_name, role, fields["csrf"], digest)

    def end(self, session: Session) -> None:
        self.redis.delete(keys.web_session(session.digest))

    def _ttl(self, created: float) -> int:
        """Seconds the session may live from now: idle time, capped by its maximum age."""
        left = created + SESSION_MAX_SECONDS - time.time()
        return int(min(self.idle_seconds, left))


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())


# --- the login slow-down ---------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What `LoginThrottle.attempt` answered: `wait` 0 means go ahead (the attempt is counted
    as a failure until taken back); the rest lets `take_back` restore the counters."""

    wait: int
    at: str = ""
    previous: tuple[str, str] = ("", "")


class LoginThrottle:
    """Failed logins in a row per (user name, client) and per client, in Redis (shared by
    every replica of the console). A client is `client_group` of its address: an IPv6
    client is its /56 (one customer's addresses are one client).

    `attempt` is asked before a password is checked: it refuses while either count is locked
    out, else counts the attempt as a failure at once (atomically, so guesses sent in
    parallel are counted as they arrive); `take_back` undoes that for a login that succeeded
    or whose password was never checked. No lock is kept per user name alone: guesses from
    elsewhere cannot lock a user out of their own address (what bounds guessing from many
    addresses: docs/console.md, "Logins").
    """

    def __init__(self, redis_client: Redis) -> None:
        self.redis = redis_client
        self._attempt = redis_client.register_script(scripts.load("web_login_attempt"))
        self._take_back = redis_client.register_script(scripts.load("web_login_take_back"))

    def attempt(self, name: str, client: str) -> Attempt:
        at = repr(time.time())
        answer = self._attempt(
            keys=self._keys(name, client),
            args=[at, FREE_FAILURES, LOCKOUT_BASE_SECONDS, LOCKOUT_MAX_SECONDS,
                  FAILURE_WINDOW_SECONDS],
        )  # fmt: skip
        fields = [item.decode() if isinstance(item, bytes) else str(item) for item in answer]
        seconds = float(fields[0])
        if seconds > 0:  # refused, however little is left: never rounded down to "go"
            return Attempt(wait=max(1, math.ceil(seconds)))
        return Attempt(wait=0, at=at, previous=(fields[1], fields[2]))

    def take_back(self, name: str, client: str, attempt: Attempt, *, succeeded: bool) -> None:
        """Undo an attempt that went ahead: `succeeded` (the password was right: the
        (user, client) count is cleared) or never checked (no hashing slot was free)."""
        if attempt.wait or not attempt.at:  # refused: nothing was counted
            return
        self._take_back(
            keys=self._keys(name, client),
            args=[attempt.at, *attempt.previous, "1" if succeeded else "0"],
        )

    @staticmethod
    def _keys(name: str, client: str) -> list[str]:
        group = client_group(client)
        return [
            keys.web_login_failures(_digest(f"user:{name}\nclient:{group}")),
            keys.web_login_failures(_digest(f"client:{group}")),
        ]


def client_group(address: str) -> str:
    """The client a login is counted against: an IPv4 address (also one carried in an IPv6
    address: mapped, compatible, NAT64, 6to4, Teredo), the /56 network of an IPv6 one (what
    ISPs commonly give one customer), or the text as given when it is no address. A port
    or brackets around the address (`1.2.3.4:80`, `[2001:db8::1]:443`) are left out."""
    ip = _address(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        carried = _carried_ipv4(ip)
        if carried is not None:
            return str(carried)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    candidates = [text]
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        candidates.append(text[1 : text.index("]")])
    elif text.count(":") == 1:  # v4:port
        candidates.append(text.split(":", 1)[0])
    for candidate in candidates:
        try:
            return ipaddress.ip_address(candidate.split("%", 1)[0])  # no scope id
        except ValueError:
            continue
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, still parsed


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client's address
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 0xFFFF):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def lockout_seconds(failures: int) -> int:
    """How long the `failures`-th failure in a row locks logins out (0 below FREE_FAILURES)."""
    if failures < FREE_FAILURES:
        return 0
    return min(LOCKOUT_MAX_SECONDS, LOCKOUT_BASE_SECONDS * 2 ** min(failures - FREE_FAILURES, 16))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
