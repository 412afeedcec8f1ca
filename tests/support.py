"""Test support: a private redis-server, Celery worker subprocesses, waiting on conditions.

Importable from every test (pytest `pythonpath = ["tests"]`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis

from worker import keys

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

REDIS_PASSWORD = "test-redis-pw-4711"  # the tests also prove a password in the URL works


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition!r} (last={last!r})"
    )


class Clock:
    """A clock a test moves by hand: `clock.now += 5`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fiscal-worker ARGS` in a subprocess, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, persistent (AOF) so it can be restarted."""

    def __init__(self, directory: Path, password: str | None = REDIS_PASSWORD) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, decode: bool = True) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=decode)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args)
        wait_for(self._ping, timeout=10, what=f"redis-server on port {self.port}")

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def write_credentials(path: Path, brands: dict[str, tuple[str, str]]) -> Path:
    doc = {b: {"client_id": cid, "client_secret": secret} for b, (cid, secret) in brands.items()}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


class WorkerProcess:
    """`celery -A worker.app worker` in a subprocess, its log in a file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, name: str, concurrency: int = 2
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.name = name
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        args = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "--hostname", f"{self.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            args, env=self.env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_for(self.ready, timeout=30, what=f"worker {self.name} ready")
        return self

    def ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
        return "event=worker_service_started" in self.log() and " ready." in self.log()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), like a lost pod."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """Warm shutdown (SIGTERM), as Kubernetes does; SIGKILL if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stray pool children, if any
        return self.process.returncode


# --- pipeline helpers ----------------------------------------------------------------
def xadd(r: redis.Redis, payload: Any, stream: str = "fiscal:results") -> str:
    data = payload if isinstance(payload, str | bytes) else json.dumps(payload)
    return str(r.xadd(stream, {"data": data}))


def closed(rid: int, **fields: Any) -> dict[str, Any]:
    receipt = {
        "id": rid,
        "status": 2,
        "closed_at": "2026-11-27 12:00:00",
        "fiscal_id": None,
        "lock": False,
    }
    receipt.update(fields)
    return receipt


def finished(r: redis.Redis) -> bool:
    """No result left unfinished and nothing left in the stream."""
    return r.zcard(keys.SCHEDULE) == 0 and r.xlen("fiscal:results") == 0


def wait_finished(r: redis.Redis, timeout: float = 30) -> None:
    wait_for(lambda: finished(r), timeout=timeout, what="all results finished")


def dlq_entries(r: redis.Redis) -> list[dict[str, Any]]:
    ids = r.zrange(keys.DLQ_INDEX, 0, -1)
    return [json.loads(r.get(keys.dlq_entry(i))) for i in ids]


def patches(fake: Any, brand: str, receipt_id: int) -> list[dict[str, Any]]:
    return fake.stats()["receipts"].get(f"{brand}:{receipt_id}", {}).get("patch_bodies", [])
