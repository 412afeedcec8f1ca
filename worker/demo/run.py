"""Running the demo: the embedded Redis, the fake API, the worker and the simulated adapter,
then waiting until every result is settled; everything stopped on any exit (normal, error,
Ctrl-C, SIGTERM). The processes come from the shared harness (worker.testing)."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis

from worker.demo.plan import (
    BRANDS,
    FAKE_RATE_LIMIT,
    INTEGRATOR_ID,
    LATENCY_SECONDS,
    MALFORMED,
    MIN_RESULTS,
    SEND_SECONDS,
    STREAM,
    UNKNOWN,
    WORKER_SETTINGS,
    Plan,
    Send,
    build_plan,
)
from worker.demo.report import (
    Progress,
    Snapshot,
    exactly_once,
    indent,
    outcome_differences,
    print_dlq,
    print_summary,
    progress_line,
    say,
    snapshot,
    unexpected_errors,
    unfinished,
    warn,
)

# Imported here, not when first used: without the `demo` extra, `import worker.demo` fails.
from worker.fake_clopos import FakeClopos
from worker.ingest_format import submit
from worker.settings import ENV_PREFIX, redact_url
from worker.testing import (
    RedisServer,
    StartError,
    WorkerProcess,
    clean_env,
    free_port,
    ping,
    start_fake_clopos,
    worker_env,
    write_credentials,
)

SETTLE_CAP_SECONDS = 50.0  # from the start: then report what is unfinished (leaves time to stop)
WORKER_START_TIMEOUT = 30.0  # celery imports, forks 4 children, connects
WORKER_STOP_TIMEOUT = 10.0  # warm shutdown (SIGTERM), then SIGKILL of its process group
REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL
POLL_SECONDS = 0.2  # how often the settle loop looks at Redis
CONSOLE_PORT = 9810  # `--web`: the console's own default, else a free port
CONSOLE_START_TIMEOUT = 20.0
CONSOLE_STOP_TIMEOUT = 5.0
LOG_TAIL_LINES = 15  # lines of the worker log shown when it fails


RedisError = redis.exceptions.RedisError  # run_demo's `redis` argument hides the module


class DemoError(Exception):
    """An expected failure of the demo: one line, and maybe the lines of a log that explain it."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


# --- embedded Redis ------------------------------------------------------------------------


class EmbeddedRedis(Protocol):
    kind: str

    @property
    def url(self) -> str: ...  # carries the password: never printed except on request (--keep)

    @property
    def pid(self) -> int | None: ...  # None: it runs in this process

    def start(self) -> None: ...

    def stop(self) -> None: ...


class RedisServerProcess(RedisServer):
    """A private redis-server: free port, random password, no persistence, config in
    `directory`, in its own session (a Ctrl-C in the terminal is ours to handle, not its)."""

    def __init__(self, binary: str, directory: Path, password: str) -> None:
        super().__init__(
            directory,
            password,
            persistent=False,
            detached=True,
            port_attempts=3,
            start_timeout=REDIS_START_TIMEOUT,
            stop_timeout=REDIS_STOP_TIMEOUT,
            binary=binary,
        )

    def start(self) -> None:
        try:
            super().start()
        except StartError:
            raise DemoError("redis-server did not start", _tail(self.log_path)) from None


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
        while not ping(self.url):
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


def demo_worker(env: dict[str, str], directory: Path) -> WorkerProcess:
    """`celery -A worker.app worker` in its own session; its log in the demo dir.

    `--logfile` puts the demo dir on its command line too, so a leftover is easy to find.
    """
    return WorkerProcess(
        env,
        directory / "worker.log",
        name="demo",
        concurrency=4,
        cwd=directory,
        logfile_option=True,
        start_timeout=WORKER_START_TIMEOUT,
    )


def start_worker(worker: WorkerProcess) -> None:
    try:
        worker.start()
    except StartError as exc:
        if exc.exited:
            raise DemoError("the worker exited at start") from None
        raise DemoError(f"the worker did not start in {WORKER_START_TIMEOUT:.0f} s") from None


def stop_worker(worker: WorkerProcess) -> None:
    """Warm shutdown (SIGTERM to its process group); SIGKILL if it hangs."""
    worker.stop(WORKER_STOP_TIMEOUT, group=True)


def demo_worker_env(redis_url: str, api_url: str, credentials: Path) -> dict[str, str]:
    return worker_env(
        redis_url=redis_url,
        clopos_url=api_url,
        integrator_id=INTEGRATOR_ID,
        credentials_file=credentials,
        settings={ENV_PREFIX + name: value for name, value in WORKER_SETTINGS.items()},
    )


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- the fake API --------------------------------------------------------------------------


def start_fake(plan: Plan, credentials: dict[str, tuple[str, str]]) -> FakeClopos:
    fake = start_fake_clopos(credentials, integrator_id=INTEGRATOR_ID, rate_limit=FAKE_RATE_LIMIT)
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


# --- the run -------------------------------------------------------------------------------


@dataclass
class Running:
    directory: Path
    redis: EmbeddedRedis | None = None
    fake: FakeClopos | None = None
    worker: WorkerProcess | None = None
    adapter: Adapter | None = None
    console: subprocess.Popen[bytes] | None = None  # `fiscal-worker web` (--web)
    save_log: bool = False  # keep the worker log beyond the demo dir

    def stop(self) -> list[str]:
        """Stop everything this run started, in reverse order; never raises.

        Returns the names of what was stopped."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.console is not None:
            console = self.console
            steps.append(("console", lambda: _stop_console(console)))
        if self.adapter is not None:
            adapter = self.adapter
            steps.append(("adapter", lambda: (adapter.stopping.set(), adapter.join(5))))
        if self.worker is not None:
            worker = self.worker
            steps.append(("worker", lambda: stop_worker(worker)))
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


def run_demo(keep: bool = False, redis: str = "auto", results: int = 200, web: bool = False) -> int:
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
            code = _run(running, keep=keep or web, redis_mode=redis, results=results, web=web)
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


def _run(running: Running, *, keep: bool, redis_mode: str, results: int, web: bool = False) -> int:
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
    env = demo_worker_env(
        running.redis.url,
        fake.base_url or "",
        write_credentials(directory / "credentials.json", credentials),
    )
    running.worker = worker = demo_worker(env, directory)
    start_worker(worker)
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
    if web:
        _start_console(running, cli_env)
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


def _start_console(running: Running, env: dict[str, str]) -> None:
    """`fiscal-worker web` on this demo's Redis, with a one-time password for `admin`."""
    password = secrets.token_urlsafe(12)
    port = CONSOLE_PORT if _port_free(CONSOLE_PORT) else free_port()
    log_path = running.directory / "console.log"
    with log_path.open("wb") as log:
        running.console = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "web", "--host", "127.0.0.1", "--port",
             str(port)],
            env={**env, f"{ENV_PREFIX}WEB_PASSWORD": password},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + CONSOLE_START_TIMEOUT
    while not _healthy(base):
        if running.console.poll() is not None or time.monotonic() > deadline:
            raise DemoError(f"the console did not start: {_tail(log_path) or 'no output'}")
        time.sleep(POLL_SECONDS)
    say()
    say(f"console: {base}/  (user admin, one-time password {password})")
    say("  the dead-letter store above is there to click through: filter, open, replay, purge")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except OSError:
        return False


def _stop_console(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(CONSOLE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(CONSOLE_STOP_TIMEOUT)


def _keep_running(running: Running) -> None:
    assert running.redis is not None
    say()
    say("still running (--keep). In another terminal, point the CLI at this demo's Redis:")
    say(f"  export {ENV_PREFIX}REDIS_URL='{running.redis.url}'")
    say("  (a throwaway local instance: its random password dies with the demo)")
    say("press Enter or Ctrl-C to stop everything")
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        input()
