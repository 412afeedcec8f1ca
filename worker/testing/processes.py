"""The parts of a local system, each started on a free port and stopped for good: a private
redis-server, `celery worker` processes, the fake Clopos API.

The tests, the benchmarks and the demo all run on these; each chooses what differs between
them (persistence, how a worker is stopped, timeouts) by argument.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from worker.fake_clopos import FakeClopos

READY_POLL = 0.05  # seconds between readiness checks
KILL_WAIT = 10.0  # seconds to reap a process after SIGKILL
LOG_TAIL_CHARS = 4000  # of a worker's log in a StartError


class StartError(subprocess.SubprocessError):
    """A process did not come up: it exited (`exited`) or was not ready in time."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- redis-server ----------------------------------------------------------------------


def ping(url: str) -> bool:
    """Whether a Redis answers PING at `url` within a second."""
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A private redis-server on 127.0.0.1 and a free port; config, data and log in `directory`.

    Its config is a 0600 file, so the password is not on its command line (where `ps` shows
    it); the process title keeps the config's path (redis >= 6.2), so a leftover is found
    by its directory.

    persistent: AOF with fsync on every write, so nothing acknowledged is lost over
        `restart()` (same port) or SIGKILL; else no persistence at all.
    detached: its own session (a Ctrl-C in the terminal is the caller's to handle), no
        output on the caller's terminal.
    port_attempts: how many free ports `start()` tries (another process may take one
        before redis binds it); `restart()` keeps the port.
    """

    kind = "redis-server"

    def __init__(
        self,
        directory: Path,
        password: str | None = None,
        *,
        persistent: bool = True,
        detached: bool = False,
        port_attempts: int = 1,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.persistent = persistent
        self.detached = detached
        self.port_attempts = port_attempts
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL; it carries the password."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def config_path(self) -> Path:
        return self.directory / "redis.conf"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, decode: bool = True, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=decode, **options)

    def ping(self) -> bool:
        """PING through `client()`, so a subclass's connection options (TLS) apply."""
        try:
            with self.client(socket_timeout=1, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def config(self, binary: str) -> dict[str, str]:
        """The redis.conf directives (name -> value)."""
        directives = {"port": str(self.port), "bind": "127.0.0.1"}
        if self.password:
            directives["requirepass"] = self.password
        directives["save"] = ""
        if self.persistent:
            directives |= {"appendonly": "yes", "appendfsync": "always"}
        else:
            directives["appendonly"] = "no"
        directives |= {"dir": str(self.directory), "logfile": str(self.log_path)}
        directives["daemonize"] = "no"
        if _has_proc_title_template(binary):
            directives["proc-title-template"] = "{title} {listen-addr} {config-file}"
        return directives

    def start(self) -> None:
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        for attempt in range(self.port_attempts):
            if attempt:
                self.port = free_port()
            if self._start_once(binary):
                return
        raise StartError(
            f"redis-server did not start on port {self.port} (log: {self.log_path})", exited=True
        )

    def _start_once(self, binary: str) -> bool:
        text = "".join(f"{name} {_quoted(value)}\n" for name, value in self.config(binary).items())
        self.config_path.touch(mode=0o600)
        self.config_path.chmod(0o600)
        self.config_path.write_text(text, encoding="utf-8")
        output = subprocess.DEVNULL if self.detached else None
        self.process = subprocess.Popen(
            [binary, str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=self.detached,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self.ping():
                return True
            time.sleep(READY_POLL)
        self.stop()
        return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """`sig` (SIGTERM: a clean shutdown), SIGKILL if it is still there after the timeout."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(KILL_WAIT)

    def restart(self) -> None:
        self.stop()
        self.start()


@functools.cache
def _has_proc_title_template(binary: str) -> bool:
    """redis >= 6.2 has the `proc-title-template` setting."""
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = re.search(r"v=(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= (6, 2)


def _quoted(value: str) -> str:
    """A redis.conf argument: double-quoted, backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- celery worker -----------------------------------------------------------------------


class WorkerProcess:
    """`celery -A worker.app worker` in its own session (process group), its stdout and
    stderr appended to `log_path`.

    pool: Celery's execution pool, `prefork` (the default, as deployed), `threads` or `solo`.
    logfile_option: also pass `--logfile log_path`, which puts the log's directory on the
    worker's command line (and its pool children's), so a leftover is found by it.
    """

    POOLS = ("prefork", "threads", "solo")

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        name: str,
        concurrency: int = 2,
        cwd: Path | None = None,
        logfile_option: bool = False,
        start_timeout: float = 30.0,
        pool: str = "prefork",
    ) -> None:
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, not {pool!r}")
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.concurrency = concurrency
        self.cwd = cwd
        self.logfile_option = logfile_option
        self.start_timeout = start_timeout
        self.pool = pool
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start it and wait until it is ready (its service started, celery's " ready.")."""
        args = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--pool", self.pool, "--concurrency", str(self.concurrency),
            "--hostname", f"{self.name}@%h", "--loglevel", "INFO",
        ]  # fmt: skip
        if self.logfile_option:
            args += ["--logfile", str(self.log_path)]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                env=self.env,
                cwd=None if self.cwd is None else str(self.cwd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self.process.poll() is not None:
                tail = self.log()[-LOG_TAIL_CHARS:]
                raise StartError(f"worker {self.name} exited:\n{tail}", exited=True)
            if time.monotonic() > deadline:
                tail = self.log()[-LOG_TAIL_CHARS:]
                message = f"worker {self.name} not ready in {self.start_timeout:.0f} s:\n{tail}"
                raise StartError(message, exited=False)
            time.sleep(READY_POLL)
        return self

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

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), like a lost pod."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(KILL_WAIT)

    def stop(self, timeout: float = 30.0, *, group: bool = False) -> int | None:
        """Warm shutdown: SIGTERM to the main process, as Kubernetes does (`group`: to the
        whole process group, as a Ctrl-C in a terminal does); SIGKILL to the group if it is
        not gone after `timeout`. Returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(KILL_WAIT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a pool child that outlived its parent
        return process.returncode


# --- the fake Clopos API -------------------------------------------------------------------


def start_fake_clopos(
    credentials: Mapping[str, tuple[str, str]], *, integrator_id: str, **options: Any
) -> FakeClopos:
    """The fake Clopos API with these brands ({brand: (client_id, client_secret)}), served
    from a thread on a free port of 127.0.0.1 (its `base_url`); `options` go to FakeClopos."""
    from worker.fake_clopos import FakeClopos  # the `demo` extra, imported only when used

    fake = FakeClopos(
        integrator_id=integrator_id,
        brands={b: {"client_id": cid, "client_secret": s} for b, (cid, s) in credentials.items()},
        **options,
    )
    fake.start()
    return fake
