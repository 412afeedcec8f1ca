"""Integration fixtures: a private redis-server, the fake Clopos API over HTTP, and real
`celery worker` subprocesses configured through the environment, as in production."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from support import ROOT, RedisServer

from worker.fake_clopos import FakeClopos
from worker.testing import WorkerProcess, start_fake_clopos, worker_env, write_credentials

BRANDS = {
    "openapitest": ("client-openapitest", "secret-openapitest-0001"),
    "brand2": ("client-brand2", "secret-brand2-0002"),
}
INTEGRATOR = "fake-integrator"


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
    api = start_fake_clopos(BRANDS, integrator_id=INTEGRATOR)
    yield api
    api.stop()


@pytest.fixture
def env(redis_server: RedisServer, fake: FakeClopos, tmp_path: Path) -> dict[str, str]:
    return worker_env(
        redis_url=redis_server.url,
        clopos_url=str(fake.base_url),
        integrator_id=INTEGRATOR,
        credentials_file=write_credentials(tmp_path / "creds.json", BRANDS),
        settings=FAST,
    )


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(
        name: str = "w1", concurrency: int = 2, pool: str = "prefork", **overrides: str
    ) -> WorkerProcess:
        process = WorkerProcess(
            {**env, **overrides},
            tmp_path / f"{name}.log",
            name=name,
            concurrency=concurrency,
            pool=pool,
            cwd=ROOT,
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop(timeout=20)
