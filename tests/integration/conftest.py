"""Integration fixtures: a private redis-server, the fake Clopos API over HTTP, and real
`celery worker` subprocesses configured through the environment, as in production."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from support import RedisServer, WorkerProcess, write_credentials

from worker.fake_clopos import FakeClopos

BRANDS = {
    "openapitest": ("client-openapitest", "secret-openapitest-0001"),
    "brand2": ("client-brand2", "secret-brand2-0002"),
}
INTEGRATOR = "fake-integrator"

pytestmark = pytest.mark.integration

# Short windows and leases so every outcome is reached within seconds.
FAST = {
    "FISCAL_NOT_READY_RETRY_WINDOW_SECONDS": "6",
    "FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS": "6",
    "FISCAL_RESULT_DEADLINE_SECONDS": "120",
    "FISCAL_RETRY_BASE_SECONDS": "0.2",
    "FISCAL_RETRY_MAX_DELAY_SECONDS": "1",
    "FISCAL_NOT_READY_MAX_DELAY_SECONDS": "1",
    "FISCAL_CLAIM_IDLE_SECONDS": "2",
    "FISCAL_RUN_LEASE_SECONDS": "5",
    "FISCAL_WORKER_LEASE_SECONDS": "5",
    "FISCAL_WORKER_HEARTBEAT_SECONDS": "1",
    "FISCAL_QUEUE_LEASE_SECONDS": "20",
    "FISCAL_RECEIPT_LOCK_SECONDS": "10",
    "FISCAL_HTTP_TIMEOUT_SECONDS": "3",
}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


@pytest.fixture
def fake() -> Iterator[FakeClopos]:
    api = FakeClopos(
        integrator_id=INTEGRATOR,
        brands={b: {"client_id": cid, "client_secret": s} for b, (cid, s) in BRANDS.items()},
    )
    api.start()
    yield api
    api.stop()


@pytest.fixture
def env(redis_server: RedisServer, fake: FakeClopos, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FISCAL_")}
    base.update(FAST)
    base.update(
        {
            "FISCAL_REDIS_URL": redis_server.url,
            "FISCAL_CLOPOS_BASE_URL": fake.base_url,
            "FISCAL_CLOPOS_INTEGRATOR_ID": INTEGRATOR,
            "FISCAL_CLOPOS_CREDENTIALS_FILE": str(
                write_credentials(tmp_path / "creds.json", BRANDS)
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return base


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str = "w1", concurrency: int = 2, **overrides: str) -> WorkerProcess:
        worker_env = {**env, **overrides}
        process = WorkerProcess(
            worker_env, tmp_path / f"{name}.log", name=name, concurrency=concurrency
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop(timeout=20)
