"""Test support: the shared harness (worker.testing) as the tests use it, and test helpers.

Importable from every test (pytest `pythonpath = ["tests"]`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.testing import (  # noqa: F401  # re-exported: the tests import them from here
    free_port,
    processes,
    wait_for,
    write_credentials,
)

ROOT = Path(__file__).resolve().parent.parent

REDIS_PASSWORD = "test-redis-pw-4711"  # the tests also prove a password in the URL works


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


class RedisServer(processes.RedisServer):
    """The tests' redis-server: a password (REDIS_PASSWORD unless given), persistent (AOF,
    fsync always) so it can be restarted or killed without losing anything acknowledged."""

    def __init__(self, directory: Path, password: str | None = REDIS_PASSWORD) -> None:
        super().__init__(directory, password)


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
