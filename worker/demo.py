"""`fiscal-worker demo`: the whole system on one machine, nothing installed, in under a minute.

What runs, all started here and all stopped on any exit (normal, error, Ctrl-C, SIGTERM):
    embedded Redis  a private, password-protected `redis-server` on a free port in a temp
                    dir; where none is installed, fakeredis's TCP server in a thread
    fake Clopos     worker/fake_clopos.py in this process, seeded with every kind of receipt
    worker          a real `celery -A worker.app worker` subprocess in its own process group
    adapter         threads writing ~200 results to the ingest stream over a few seconds:
                    duplicates (some at once, some later), an unknown brand, malformed entries
Then it waits until every result is settled, prints what happened with an exactly-once
check, and shows the dead-letter store through the real CLI. Exit status 0 when every
result was settled as planned and the check passed, 1 otherwise.

The plan (`build_plan`) is pure: which receipts exist, what is sent when, and what each
send must end as. Everything else is the imperative shell around it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis

from worker import keys
from worker.dlq import REASONS, DeadLetterStore
from worker.fake_clopos import FakeClopos
from worker.ingest_format import submit
from worker.settings import ENV_PREFIX, redact_url

# --- the numbers -----------------------------------------------------------------------

SETTLE_CAP_SECONDS = 50.0  # from the start: then report what is unfinished (leaves time to stop)
SEND_SECONDS = 4.0  # the adapter spreads its results over this long
WORKER_START_TIMEOUT = 30.0  # celery imports, forks 4 children, connects
WORKER_STOP_TIMEOUT = 10.0  # warm shutdown (SIGTERM), then SIGKILL of its process group
REDIS_START_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0  # one `fiscal-worker dlq ...` subprocess
POLL_SECONDS = 0.2  # how often the settle loop looks at Redis
PROGRESS_SECONDS = 1.0  # one progress line this often (when stdout is not a terminal)
LOG_TAIL_LINES = 15  # lines of the worker log shown when it fails

STREAM = "fiscal:results"  # the contract's default FISCAL_INGEST_STREAM
INTEGRATOR_ID = "demo-integrator"
BRANDS = ("openapitest", "demo-cafe")
UNKNOWN_BRAND = "ghost-bistro"  # has no credentials: unknown_brand
FAKE_RATE_LIMIT = 3000  # per brand per minute: the real 300 would make the demo wait for 429s
LATENCY_SECONDS = {"openapitest": 0.025, "demo-cafe": 0.045}  # the fake API's answer time

# Demo-sized windows so every outcome is reached within seconds (production: minutes/hours).
WORKER_SETTINGS = {
    "NOT_READY_RETRY_WINDOW_SECONDS": "12",
    "NOT_READY_MAX_DELAY_SECONDS": "1",
    "TRANSIENT_RETRY_WINDOW_SECONDS": "20",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_DELAY_SECONDS": "1",
    "RUN_LEASE_SECONDS": "10",
    "QUEUE_LEASE_SECONDS": "20",
    "RECEIPT_LOCK_SECONDS": "10",
    "CLAIM_IDLE_SECONDS": "5",
    "HTTP_TIMEOUT_SECONDS": "5",
    "RATE_LIMIT_REQUESTS": str(FAKE_RATE_LIMIT),
    "RATE_LIMIT_WINDOW_SECONDS": "60",
    "LOG_LEVEL": "INFO",
}

# How many results of each special kind the adapter sends (the rest are plain ones).
MALFORMED = 7  # one of each _malformed_entries()
UNKNOWN = 2
ALREADY_FISCALISED = 5  # closed, our fiscal_id already on it and locked: no PATCH
CONFLICTING = 3  # another fiscal_id already on it: fiscal_id_conflict
CLOSING_LATER = 5  # open, closes after 2-8 s
APPEARING_LATER = 3  # 404 for 2-5 s, then there
MISSING = 3  # 404 for good: receipt_not_found after the not-ready window
OTHER_VENUE = 3  # demo-cafe receipts of venue 2, sent with venue_id
# (status, count, method) of the transient faults injected on one receipt each
FLAKY = ((500, 1, "GET"), (503, 2, "ANY"), (502, 2, "GET"), (503, 1, "PATCH"), (504, 1, "GET"))
FIXED_KINDS = (
    MALFORMED
    + UNKNOWN
    + ALREADY_FISCALISED
    + CONFLICTING
    + CLOSING_LATER
    + APPEARING_LATER
    + MISSING
    + OTHER_VENUE
    + len(FLAKY)
)
MIN_RESULTS = FIXED_KINDS + 14  # room for a few duplicates and plain results

EXPECTED_REASONS = ("invalid_message", "unknown_brand", "fiscal_id_conflict", "receipt_not_found")
OUTCOMES = ("fiscalised", "already_done", "duplicate", *(f"dead_lettered:{r}" for r in REASONS))


RedisError = redis.exceptions.RedisError  # run_demo's `redis` argument hides the module


class DemoError(Exception):
    """An expected failure of the demo: one line, and maybe the lines of a log that explain it."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


# --- the plan (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class SeedReceipt:
    brand: str
    receipt: dict[str, Any]
    close_after: float | None = None
    appear_after: float | None = None
    fault: tuple[int, int, str] | None = None  # fail_next (status, count, method)


@dataclass(frozen=True)
class Send:
    at: float  # seconds after the adapter starts
    fields: dict[str, Any] | None = None  # submit() keyword arguments
    raw: bytes | None = None  # or a malformed `data` field, written with XADD as is
    group: int | None = None  # sends of one group go out at the same moment, from threads


@dataclass
class Plan:
    receipts: list[SeedReceipt]
    sends: list[Send]
    expected: Counter[str]  # outcome counter -> how many the worker must report
    final_fiscal_ids: dict[tuple[str, int], str]  # what each receipt must end up with

    def batches(self) -> list[list[Send]]:
        """The sends in time order; a concurrent group is one batch."""
        grouped: dict[Any, list[Send]] = defaultdict(list)
        for index, send in enumerate(self.sends):
            grouped[("g", send.group) if send.group is not None else ("s", index)].append(send)
        return sorted(grouped.values(), key=lambda batch: batch[0].at)

    @property
    def valid_sends(self) -> int:
        return sum(1 for send in self.sends if send.fields is not None)


def build_plan(total: int, rng: random.Random) -> Plan:
    """`total` stream entries: every outcome of contract §4 that a healthy API can produce."""
    if total < MIN_RESULTS:
        raise ValueError(f"the demo needs at least {MIN_RESULTS} results")
    duplicates = max(5, total // 10)
    plain = total - FIXED_KINDS - duplicates
    next_id = {"openapitest": 1001, "demo-cafe": 5001}
    receipts: list[SeedReceipt] = []
    sends: list[Send] = []
    expected: Counter[str] = Counter()
    finals: dict[tuple[str, int], str] = {}
    originals: list[int] = []  # indexes into `sends` a duplicate may copy

    def new_id(brand: str) -> int:
        next_id[brand] += 1
        return next_id[brand] - 1

    def result(brand: str, rid: int, fiscal: str, **extra: Any) -> dict[str, Any]:
        device = f"{'fp' if brand == 'openapitest' else 'cafe'}-printer-{rng.randint(1, 6)}"
        return {
            "brand": brand,
            "receipt_id": rid,
            "fiscal_id": fiscal,
            "device_id": device,
            "result_id": f"res-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}",
            **extra,
        }

    def send(at: float, fields: dict[str, Any], *, copyable: bool = False) -> None:
        if copyable:
            originals.append(len(sends))
        sends.append(Send(at=round(at, 3), fields=fields))

    def brand_pick() -> str:
        return "openapitest" if rng.random() < 0.6 else "demo-cafe"

    early = (0.0, 0.5)  # not-ready receipts go first: their windows start early
    main = (0.0, SEND_SECONDS * 0.8)  # leaves the end for re-sent duplicates
    anytime = (0.0, SEND_SECONDS)

    for _ in range(plain):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid)))
        send(rng.uniform(*main), result(brand, rid, fiscal), copyable=True)
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(ALREADY_FISCALISED):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid, fiscal_id=fiscal, lock=True)))
        send(rng.uniform(*main), result(brand, rid, fiscal), copyable=True)
        expected["already_done"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(CONFLICTING):
        brand, theirs = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid, fiscal_id=theirs, lock=True)))
        send(rng.uniform(*anytime), result(brand, rid, _fiscal_id(rng)))
        expected["dead_lettered:fiscal_id_conflict"] += 1
        finals[(brand, rid)] = theirs  # never overwritten
    for _ in range(CLOSING_LATER):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        delay = round(rng.uniform(2, 8), 1)
        receipts.append(SeedReceipt(brand, _closed(rid), close_after=delay))
        send(rng.uniform(*early), result(brand, rid, fiscal), copyable=True)
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(APPEARING_LATER):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        delay = round(rng.uniform(2, 5), 1)
        receipts.append(SeedReceipt(brand, _closed(rid), appear_after=delay))
        send(rng.uniform(*early), result(brand, rid, fiscal))
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(MISSING):
        brand = brand_pick()
        send(rng.uniform(*early), result(brand, new_id(brand), _fiscal_id(rng)))
        expected["dead_lettered:receipt_not_found"] += 1
    for fault in FLAKY:
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid), fault=fault))
        send(rng.uniform(*main), result(brand, rid, fiscal))
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(OTHER_VENUE):
        fiscal = _fiscal_id(rng)
        rid = new_id("demo-cafe")
        receipts.append(SeedReceipt("demo-cafe", _closed(rid, venue_id=2)))
        send(rng.uniform(*anytime), result("demo-cafe", rid, fiscal, venue_id=2))
        expected["fiscalised"] += 1
        finals[("demo-cafe", rid)] = fiscal
    for number in range(UNKNOWN):
        fields = result(UNKNOWN_BRAND, 7001 + number, _fiscal_id(rng))
        send(rng.uniform(*anytime), fields)
        expected["dead_lettered:unknown_brand"] += 1
    for raw in _malformed_entries():
        sends.append(Send(at=round(rng.uniform(0.5, SEND_SECONDS), 3), raw=raw))
        expected["dead_lettered:invalid_message"] += 1

    # Duplicates: the same result again (same result_id), half at the same moment as the
    # original from other threads, half re-sent at the end. Each is absorbed: one PATCH.
    for number in range(duplicates):
        index = rng.choice(originals)
        original = sends[index]
        if number % 2 == 0:
            group = original.group if original.group is not None else index
            sends[index] = Send(original.at, original.fields, group=group)
            sends.append(Send(original.at, original.fields, group=group))
        else:
            at = rng.uniform(max(original.at, SEND_SECONDS * 0.85), SEND_SECONDS)
            sends.append(Send(round(at, 3), original.fields))
        expected["duplicate"] += 1
    return Plan(receipts, sends, expected, finals)


def _closed(rid: int, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "status": 2, "fiscal_id": None, "lock": False} | fields


def _fiscal_id(rng: random.Random) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(rng.choice(alphabet) for _ in range(16))


def _malformed_entries() -> list[bytes]:
    """One entry per way an adapter can get the format wrong; each is invalid_message."""
    hostile = {
        "receipt_id": 13,
        "brand": "\x1b[2J\x1b[31mPWNED\x07\r" + "B" * 300,  # clears a naive terminal
        "fiscal_id": "F\x00\x1b]0;title\x07",
    }
    return [
        b'{"receipt_id": 11, "brand": "openapitest", fiscal_id: F-11',  # not JSON
        b'[{"receipt_id": 12, "brand": "openapitest", "fiscal_id": "F-12"}]',  # an array
        b'{"receipt_id": 13, "brand": "openapitest", "device_id": "fp-printer-1"}',  # no fiscal_id
        b'{"receipt_id": "12", "brand": "openapitest", "fiscal_id": "F-STR"}',  # id as a string
        json.dumps(hostile).encode(),
        json.dumps(
            {"receipt_id": 14, "brand": "openapitest", "fiscal_id": "F-BIG", "note": "x" * 70_000}
        ).encode(),  # over 64 KiB
        b'{"receipt_id": 15, "brand": "openapitest", "fiscal_id": "F-\xff\xfe"}',  # not UTF-8
    ]


# --- embedded Redis ------------------------------------------------------------------------


class EmbeddedRedis(Protocol):
    kind: str
    url: str  # carries the password: never printed except on request (--keep)

    @property
    def pid(self) -> int | None: ...  # None: it runs in this process

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServerProcess:
    """A private redis-server: free port, random password, no persistence, config in `directory`.

    The password is in a 0600 config file, not on the command line, where `ps` would show it.
    """

    kind = "redis-server"

    def __init__(self, binary: str, directory: Path, password: str) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        for _ in range(3):  # another process may take the free port before redis binds it
            port = _free_port()
            if self._start_on(port):
                self.url = f"redis://:{self.password}@127.0.0.1:{port}/0"
                return
        raise DemoError("redis-server did not start", _tail(self.directory / "redis.log"))

    def _start_on(self, port: int) -> bool:
        config = self.directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"requirepass {self.password}",
                    'save ""',
                    "appendonly no",
                    f"dir {self.directory}",
                    f"logfile {self.directory / 'redis.log'}",
                    "daemonize no",
                    *self._title_lines(),
                    "",
                ]
            ),
            encoding="utf-8",
        )
        config.chmod(0o600)
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
        )
        url = f"redis://:{self.password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if _ping(url):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def _title_lines(self) -> list[str]:
        """redis-server rewrites its command line; keep the config path (the demo dir) in
        it, so a leftover is found by it like the worker (redis >= 6.2 has the setting)."""
        try:
            version = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        match = re.search(r"v=(\d+)\.(\d+)", version)
        if match is None or (int(match[1]), int(match[2])) < (6, 2):
            return []
        return ['proc-title-template "{title} {listen-addr} {config-file}"']

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class FakeRedisServer:
    """fakeredis's TCP server in a thread, for machines without redis-server.

    Two fixes make it fit for a Celery broker: the `lua` extra (kombu needs EVALSHA), and
    TCP_NODELAY on its connections; with Nagle's algorithm on, every reply waits for the
    client's delayed ACK (~40 ms), ~88 ms per message instead of ~2 ms.
    fakeredis accepts the password (AUTH) but does not enforce it.
    """

    kind = "fakeredis"
    pid = None

    def __init__(self, password: str) -> None:
        self.password = password
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> None:
        try:
            import lupa  # noqa: F401  # the `lua` extra: Celery's transport needs EVALSHA
            from fakeredis import TcpFakeServer
        except ImportError as exc:
            raise DemoError(f"fakeredis with its lua extra is not installed ({exc.name})") from None

        server = TcpFakeServer(("127.0.0.1", 0), server_type="redis", server_version=(7, 0))
        # A socketserver StreamRequestHandler sets TCP_NODELAY when this attribute is true.
        server.RequestHandlerClass = type(
            "NoDelayHandler", (server.RequestHandlerClass,), {"disable_nagle_algorithm": True}
        )
        server.fake_server.config[b"requirepass"] = self.password.encode()
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fakeredis"
        )
        self.thread.daemon = True
        self.thread.start()
        port = server.server_address[1]
        self.url = f"redis://:{self.password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not _ping(self.url):
            if time.monotonic() > deadline:
                raise DemoError("fakeredis's TCP server did not answer")
            time.sleep(0.05)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()  # ends serve_forever and tells every connection thread to finish
        server.server_close()  # joins the connection threads
        if self.thread is not None:
            self.thread.join(5)


def choose_redis(mode: str, directory: Path, password: str) -> EmbeddedRedis:
    binary = shutil.which("redis-server")
    if mode == "redis-server" and binary is None:
        raise DemoError("--redis redis-server: redis-server is not on PATH")
    if mode in ("auto", "redis-server") and binary is not None:
        return RedisServerProcess(binary, directory, password)
    return FakeRedisServer(password)


# --- the worker ----------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without any FISCAL_* setting of the user's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


class WorkerProcess:
    """`celery -A worker.app worker` in its own session; its log in the demo dir.

    `--logfile` puts the demo dir on its command line too, so a leftover is easy to find.
    """

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env = env
        self.directory = directory
        self.log_path = directory / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--pool", "prefork", "--concurrency", "4", "--hostname", "demo@%h",
            "--loglevel", "INFO", "--logfile", str(self.log_path),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                env=self.env,
                cwd=str(self.directory),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None:
                raise DemoError("the worker exited at start")
            if time.monotonic() > deadline:
                raise DemoError(f"the worker did not start in {WORKER_START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def ready(self) -> bool:
        text = self.log()
        return "event=worker_service_started" in text and " ready." in text

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the group), as Kubernetes does; SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a pool child that outlived its parent


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def worker_env(redis_url: str, api_url: str, credentials: Path) -> dict[str, str]:
    env = clean_env()
    env.update({ENV_PREFIX + name: value for name, value in WORKER_SETTINGS.items()})
    env.update(
        {
            f"{ENV_PREFIX}REDIS_URL": redis_url,
            f"{ENV_PREFIX}CLOPOS_BASE_URL": api_url,
            f"{ENV_PREFIX}CLOPOS_INTEGRATOR_ID": INTEGRATOR_ID,
            f"{ENV_PREFIX}CLOPOS_CREDENTIALS_FILE": str(credentials),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_credentials(path: Path, secrets_by_brand: dict[str, tuple[str, str]]) -> Path:
    doc = {b: {"client_id": cid, "client_secret": s} for b, (cid, s) in secrets_by_brand.items()}
    path.touch(mode=0o600)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


# --- the fake API --------------------------------------------------------------------------


def start_fake(plan: Plan, credentials: dict[str, tuple[str, str]]) -> FakeClopos:
    fake = FakeClopos(
        integrator_id=INTEGRATOR_ID,
        brands={b: {"client_id": cid, "client_secret": s} for b, (cid, s) in credentials.items()},
        rate_limit=FAKE_RATE_LIMIT,
    )
    fake.start()
    for brand, seconds in LATENCY_SECONDS.items():
        fake.set_latency(seconds, brand=brand)
    fake.set_latency(min(LATENCY_SECONDS.values()))  # auth, before a call has a brand
    for seed in plan.receipts:
        fake.add_receipt(seed.brand, seed.receipt)
    return fake


def arm_faults(fake: FakeClopos, plan: Plan) -> None:
    """Start the clocks of the late receipts and queue the faults, just before sending."""
    for seed in plan.receipts:
        rid = seed.receipt["id"]
        if seed.close_after is not None:
            fake.close_after(seed.brand, rid, seed.close_after)
        if seed.appear_after is not None:
            fake.appear_after(seed.brand, rid, seed.appear_after)
        if seed.fault is not None:
            status, count, method = seed.fault
            fake.fail_next(seed.brand, rid, status, count=count, method=method)


# --- the simulated adapter -------------------------------------------------------------------


class Adapter(threading.Thread):
    """Writes the plan's sends to the stream on schedule; concurrent groups from threads."""

    def __init__(self, redis_url: str, plan: Plan) -> None:
        super().__init__(name="demo-adapter", daemon=True)
        self.redis_url = redis_url
        self.plan = plan
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None
        self._lock = threading.Lock()
        self.sent = 0

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        start = time.monotonic()
        try:
            for batch in self.plan.batches():
                if self.stopping.wait(max(0.0, start + batch[0].at - time.monotonic())):
                    return
                if len(batch) == 1:
                    self._send(client, batch[0])
                else:
                    self._send_at_once(client, batch)
        except Exception as exc:  # reported by the main thread as one line
            self.error = f"{exc.__class__.__name__}: {exc}"
        finally:
            client.close()
            self.finished.set()

    def _send(self, client: redis.Redis, send: Send) -> None:
        if send.fields is not None:
            submit(client, stream=STREAM, **send.fields)
        else:
            client.xadd(STREAM, {"data": send.raw or b""})
        with self._lock:
            self.sent += 1

    def _send_at_once(self, client: redis.Redis, batch: list[Send]) -> None:
        barrier = threading.Barrier(len(batch))
        errors: list[Exception] = []

        def go(send: Send) -> None:
            try:
                barrier.wait(5)
                self._send(client, send)
            except Exception as exc:  # threading.BrokenBarrierError included
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(send,), daemon=True) for send in batch]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        if errors:
            raise errors[0]


# --- watching ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    counters: dict[str, int]
    pending: int  # results not finished (the schedule)
    stream: int  # entries not settled yet (acknowledged ones are deleted)

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def dead_lettered(self) -> int:
        return sum(n for name, n in self.counters.items() if name.startswith("dead_lettered:"))

    @property
    def settled(self) -> int:
        done = ("fiscalised", "already_done", "duplicate")
        return sum(self.get(name) for name in done) + self.dead_lettered


def snapshot(client: redis.Redis) -> Snapshot:
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.COUNTERS)
        pipe.zcard(keys.SCHEDULE)
        pipe.xlen(STREAM)
        counters, pending, stream = pipe.execute()
    return Snapshot({str(k): int(v) for k, v in counters.items()}, int(pending), int(stream))


def progress_line(elapsed: float, sent: int, total: int, snap: Snapshot) -> str:
    fiscalised = snap.get("fiscalised") + snap.get("already_done")
    return (  # fits 80 columns
        f"[{elapsed:4.1f}s] sent {sent}/{total}  fiscalised {fiscalised}  "
        f"duplicates {snap.get('duplicate')}  dead-lettered {snap.dead_lettered}  "
        f"pending {snap.pending}"
    )


class Progress:
    """One line per second on a pipe; a single live line on a terminal."""

    def __init__(self) -> None:
        self.live: Any = None
        self.last = 0.0
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(highlight=False), refresh_per_second=4)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def show(self, line: str, force: bool = False) -> None:
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(line, no_wrap=True, overflow="ellipsis"))
            return
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(line, flush=True)


# --- checks ----------------------------------------------------------------------------------


@dataclass
class OnceCheck:
    problems: list[str] = field(default_factory=list)  # breaches of exactly-once
    not_fiscalised: list[str] = field(default_factory=list)  # receipts left without ours
    receipts_patched: int = 0
    max_concurrent: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def exactly_once(fake: FakeClopos, stats: dict[str, Any], plan: Plan) -> OnceCheck:
    """Each receipt: at most one successful PATCH, never two fiscal_ids, never overwritten,
    never two PATCHes in flight at once."""
    check = OnceCheck()
    ok_patches: Counter[tuple[str, int]] = Counter()
    for _at, method, brand, rid, status in stats["request_log"]:
        if method == "PATCH" and status == 200 and brand is not None and rid is not None:
            ok_patches[(brand, int(rid))] += 1
    check.receipts_patched = len(ok_patches)
    for (brand, rid), count in sorted(ok_patches.items()):
        if count > 1:
            check.problems.append(f"{brand}:{rid} was PATCHed successfully {count} times")
    for name, entry in sorted(stats["receipts"].items()):
        sent_ids = {b["fiscal_id"] for b in entry["patch_bodies"] if "fiscal_id" in b}
        if len(sent_ids) > 1:
            check.problems.append(f"{name} got PATCHes with {len(sent_ids)} different fiscal_ids")
        check.max_concurrent = max(check.max_concurrent, entry["max_concurrent_patches"])
        if entry["max_concurrent_patches"] > 1:
            check.problems.append(
                f"{name} had {entry['max_concurrent_patches']} PATCHes in flight at once"
            )
    for (brand, rid), want in sorted(plan.final_fiscal_ids.items()):
        receipt = fake.receipt(brand, rid) or {}
        got = receipt.get("fiscal_id")
        if got is not None and got != want:
            check.problems.append(f"{brand}:{rid} was overwritten: {got!r}, not {want!r}")
        elif got is None or receipt.get("lock") is not True:
            check.not_fiscalised.append(f"{brand}:{rid}")
    return check


def outcome_differences(snap: Snapshot, plan: Plan, check: OnceCheck) -> list[str]:
    names = sorted(set(plan.expected) | {n for n in snap.counters if n in OUTCOMES})
    differences = [
        f"{name}: {snap.get(name)}, planned {plan.expected.get(name, 0)}"
        for name in names
        if snap.get(name) != plan.expected.get(name, 0)
    ]
    if check.not_fiscalised:
        shown = ", ".join(check.not_fiscalised[:5])
        differences.append(f"{len(check.not_fiscalised)} receipts not fiscalised: {shown}")
    return differences


def api_calls(stats: dict[str, Any]) -> dict[str, int]:
    log = stats["request_log"]
    return {
        "auth": sum(stats["auth_calls"].values()),
        "GET": sum(1 for entry in log if entry[1] == "GET"),
        "PATCH": sum(1 for entry in log if entry[1] == "PATCH"),
        "429": sum(1 for entry in log if entry[4] == 429),
        "5xx": sum(1 for entry in log if entry[4] >= 500),
        "404": sum(1 for entry in log if entry[4] == 404),
    }


def unexpected_errors(log: str) -> list[str]:
    """ERROR/CRITICAL lines of the worker log, but not a dead-lettered task's FAILURE."""
    return [
        line
        for line in log.splitlines()
        if ("ERROR/" in line or "CRITICAL/" in line) and "DeadLettered" not in line
    ]


def unfinished(client: redis.Redis, limit: int = 10) -> list[str]:
    lines = []
    for rid, due in client.zrange(keys.SCHEDULE, 0, limit - 1, withscores=True):
        info = client.hmget(keys.result(rid), "brand", "receipt_id", "attempts", "last_error")
        brand, receipt_id, attempts, error = info
        wait = due - time.time()
        lines.append(
            f"{rid}: {brand}:{receipt_id} attempts {attempts or 0}, next in {wait:.1f}s, "
            f"last error: {error or '-'}"
        )
    return lines


# --- output ----------------------------------------------------------------------------------


def say(text: str = "", err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def warn(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def run_cli(env: dict[str, str], *args: str) -> str:
    """`fiscal-worker ARGS` as a subprocess, against the demo's Redis; its output."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CLI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"(fiscal-worker {' '.join(args)} did not answer in {CLI_TIMEOUT:.0f} s)"
    output = done.stdout
    if done.returncode != 0:
        output += f"(exit {done.returncode}) {done.stderr.strip()}"
    return output


def print_summary(
    snap: Snapshot, plan: Plan, stats: dict[str, Any], check: OnceCheck, elapsed: float
) -> None:
    calls = api_calls(stats)
    dead = {
        r: snap.get(f"dead_lettered:{r}")
        for r in REASONS
        if r in EXPECTED_REASONS or snap.get(f"dead_lettered:{r}")
    }
    planned = plan.expected
    say()
    say("summary")
    rows = [
        ("results sent", len(plan.sends), f"{plan.valid_sends} valid, {MALFORMED} malformed"),
        ("received by the worker", snap.get("received"), "valid stream entries"),
        ("fiscalised (PATCHed)", snap.get("fiscalised"), f"planned {planned['fiscalised']}"),
        (
            "already fiscalised (no PATCH)",
            snap.get("already_done"),
            f"planned {planned['already_done']}",
        ),
        ("duplicates absorbed", snap.get("duplicate"), f"planned {planned['duplicate']}"),
        ("dead-lettered", snap.dead_lettered, ""),
    ]
    rows += [
        (f"  {reason}", count, f"planned {planned[f'dead_lettered:{reason}']}")
        for reason, count in dead.items()
    ]
    waits = "not ready, 5xx, busy receipt, rate budget"
    rows.append(("retries scheduled", snap.get("retries_scheduled"), waits))
    for label, value, note in rows:
        say(f"  {label:<31} {value:>5}  {note}".rstrip())
    say(
        f"  {'API calls (fake Clopos)':<31} auth {calls['auth']}, GET {calls['GET']}, "
        f"PATCH {calls['PATCH']}; answered 404 {calls['404']}, 429 {calls['429']}, "
        f"5xx {calls['5xx']}"
    )
    say(f"  {'elapsed':<31} {elapsed:5.1f}s")
    if check.ok:
        say("  exactly-once check: OK")
        say(
            f"    {check.receipts_patched} receipts PATCHed, none twice, none overwritten, "
            f"at most {check.max_concurrent} PATCH in flight per receipt"
        )
    else:
        say(f"  exactly-once check: FAILED ({len(check.problems)} problems)")
        for problem in check.problems[:10]:
            say(f"    {problem}")


def print_dlq(env: dict[str, str], client: redis.Redis, plan: Plan) -> None:
    say()
    say("the dead-letter store, through the CLI")
    say("  $ fiscal-worker dlq stats")
    say(indent(run_cli(env, "dlq", "stats")))
    say("  $ fiscal-worker dlq list --limit 10")
    say(indent(run_cli(env, "dlq", "list", "--limit", "10")))
    store = DeadLetterStore(client)
    entry = next(iter(store.list(reason="receipt_not_found", limit=1)), None)
    entry = entry or next(iter(store.list(limit=1)), None)
    entry_id = entry["id"] if entry else "dl-1"
    receipt_id = min(
        (rid for (brand, rid) in plan.final_fiscal_ids if brand == "openapitest"), default=1001
    )
    say()
    say("inspect a dead-letter store yourself (with FISCAL_REDIS_URL set to your deployment's):")
    say("  fiscal-worker dlq list --reason receipt_not_found")
    say(f"  fiscal-worker dlq show {entry_id}")
    say(f"  fiscal-worker dlq replay {entry_id}")
    say(f"  fiscal-worker receipt openapitest {receipt_id}")


# --- the run -------------------------------------------------------------------------------


@dataclass
class Running:
    directory: Path
    redis: EmbeddedRedis | None = None
    fake: FakeClopos | None = None
    worker: WorkerProcess | None = None
    adapter: Adapter | None = None
    save_log: bool = False  # keep the worker log beyond the demo dir

    def stop(self) -> list[str]:
        """Stop everything this run started, in reverse order; never raises.

        Returns the names of what was stopped."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.adapter is not None:
            adapter = self.adapter
            steps.append(("adapter", lambda: (adapter.stopping.set(), adapter.join(5))))
        if self.worker is not None:
            steps.append(("worker", self.worker.stop))
        if self.fake is not None:
            steps.append(("fake Clopos", self.fake.stop))
        if self.redis is not None:
            steps.append((self.redis.kind, self.redis.stop))
        steps.append(("demo dir", lambda: shutil.rmtree(self.directory, ignore_errors=True)))
        stopped = []
        for name, step in steps:
            try:
                step()
                stopped.append(name)
            except Exception as exc:
                warn(f"could not stop the {name} cleanly: {exc.__class__.__name__}: {exc}")
        return stopped


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT end the demo like Ctrl-C does, so the cleanup runs (SIGINT too:
    a shell starts background jobs with it ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """The cleanup runs to its end (it is bounded by its own timeouts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(keep: bool = False, redis: str = "auto", results: int = 200) -> int:
    """Run the demo; returns the exit status (0: everything settled as planned, checks OK)."""
    if redis not in ("auto", "redis-server", "fakeredis"):
        warn(f"--redis must be auto, redis-server or fakeredis, not {redis!r}")
        return 2
    if results < MIN_RESULTS:
        warn(f"--results must be at least {MIN_RESULTS}")
        return 2
    directory = Path(tempfile.mkdtemp(prefix="fiscal-demo-"))
    running = Running(directory)
    code = 1
    try:
        with _terminate_as_interrupt():
            code = _run(running, keep=keep, redis_mode=redis, results=results)
    except KeyboardInterrupt:
        warn("interrupted; stopping everything")
        code = 130
    except RedisError as exc:  # the embedded Redis went away under us
        detail = str(exc)
        password = urlsplit(running.redis.url).password if running.redis else None
        if password:
            detail = detail.replace(password, "***")
        warn(f"lost the embedded Redis ({exc.__class__.__name__}: {detail})")
        code = 1
    except DemoError as exc:
        saved = _save_worker_log(running)
        warn(f"{exc} (see log: {saved})" if saved else str(exc))
        tail = exc.log_tail or (_tail(running.worker.log_path) if running.worker else "")
        if tail:
            say(indent(tail), err=True)
        code = 1
    else:
        if code != 0 or running.save_log:
            saved = _save_worker_log(running)
            if saved:
                warn(f"the worker log is kept at {saved}")
    finally:
        with _uninterruptible():
            stopped = running.stop()
        say(f"stopped and removed: {', '.join(stopped)}")
    return code


def _save_worker_log(running: Running) -> str | None:
    """The demo dir is removed on exit: keep the worker log of a failed run for a look."""
    if running.worker is None or not running.worker.log_path.exists():
        return None
    handle, path = tempfile.mkstemp(prefix="fiscal-demo-worker-", suffix=".log")
    os.close(handle)
    shutil.copyfile(running.worker.log_path, path)
    return path


def _run(running: Running, *, keep: bool, redis_mode: str, results: int) -> int:
    started = time.monotonic()
    directory = running.directory
    say(f"demo dir: {directory}")
    plan = build_plan(results, random.Random())
    password = secrets.token_urlsafe(24)
    credentials = {
        brand: (f"demo-{brand}", secrets.token_urlsafe(24)) for brand in BRANDS
    }  # client secrets live in the fake and a 0600 file only

    running.redis = choose_redis(redis_mode, directory, password)
    running.redis.start()
    where = f"pid {running.redis.pid}" if running.redis.pid else "in this process"
    say(
        f"redis: {running.redis.kind} at {redact_url(running.redis.url)} "
        f"(private, with password; {where})"
    )
    client = redis.Redis.from_url(running.redis.url, decode_responses=True, socket_timeout=5)

    running.fake = fake = start_fake(plan, credentials)
    say(
        f"fake Clopos API: {fake.base_url} (brands {', '.join(BRANDS)}; "
        f"{len(plan.receipts)} receipts seeded)"
    )
    env = worker_env(
        running.redis.url,
        fake.base_url or "",
        write_credentials(directory / "credentials.json", credentials),
    )
    running.worker = worker = WorkerProcess(env, directory)
    worker.start()
    say(f"worker: celery -A worker.app worker, prefork x4, pid {worker.pid}")
    say(f"worker log: {worker.log_path}")

    arm_faults(fake, plan)
    running.adapter = adapter = Adapter(running.redis.url, plan)
    adapter.start()
    say(
        f"adapter: sending {len(plan.sends)} results over {SEND_SECONDS:.0f} s "
        f"({plan.expected['duplicate']} duplicates, {UNKNOWN} for an unknown brand, "
        f"{MALFORMED} malformed)"
    )
    say()
    settled, snap = _wait_settled(running, client, plan, started)

    elapsed = time.monotonic() - started
    stats = fake.stats()
    check = exactly_once(fake, stats, plan)
    print_summary(snap, plan, stats, check, elapsed)
    code = 0 if settled and check.ok else 1
    if settled:
        differences = outcome_differences(snap, plan, check)
        if differences:
            say(f"  outcomes as planned: NO ({'; '.join(differences)})")
            code = 1
        else:
            say("  outcomes as planned: yes")
    else:
        say(f"  unfinished after {elapsed:.0f} s: {snap.pending} results, {snap.stream} entries")
        for line in unfinished(client):
            say(f"    {line}")
    errors = unexpected_errors(worker.log())
    if errors:
        say(f"  worker log: {len(errors)} unexpected ERROR lines, e.g. {errors[0][:160]}")
        running.save_log = True

    cli_env = clean_env() | {f"{ENV_PREFIX}REDIS_URL": running.redis.url}
    print_dlq(cli_env, client, plan)
    if keep:
        _keep_running(running)
    else:
        say("  (run `fiscal-worker demo --keep` to try them on this demo's Redis)")
    say()
    return code


def _wait_settled(
    running: Running, client: redis.Redis, plan: Plan, started: float
) -> tuple[bool, Snapshot]:
    """Poll until every sent result is settled, or the cap; (settled?, last snapshot)."""
    adapter, worker = running.adapter, running.worker
    assert adapter is not None and worker is not None
    total = len(plan.sends)
    deadline = started + SETTLE_CAP_SECONDS
    with Progress() as progress:
        while True:
            snap = snapshot(client)
            line = progress_line(time.monotonic() - started, adapter.sent, total, snap)
            if adapter.error is not None:
                raise DemoError(f"the simulated adapter failed: {adapter.error}")
            if not worker.alive():
                raise DemoError("the worker exited while results were pending")
            done = adapter.finished.is_set() and adapter.sent == total
            if done and snap.stream == 0 and snap.pending == 0 and snap.settled >= total:
                progress.show(line, force=True)
                return True, snap
            if time.monotonic() > deadline:
                progress.show(line, force=True)
                return False, snap
            progress.show(line)
            time.sleep(POLL_SECONDS)


def _keep_running(running: Running) -> None:
    assert running.redis is not None
    say()
    say("still running (--keep). In another terminal, point the CLI at this demo's Redis:")
    say(f"  export {ENV_PREFIX}REDIS_URL='{running.redis.url}'")
    say("  (a throwaway local instance: its random password dies with the demo)")
    say("press Enter or Ctrl-C to stop everything")
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        input()
