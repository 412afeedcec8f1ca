"""What every benchmark runs on: a private redis-server, the fake Clopos API with one brand,
and real `celery worker` processes configured through the environment, all stopped at exit
(the shared harness, worker.testing)."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.fake_clopos import FakeClopos
from worker.testing import (
    RedisServer,
    WorkerProcess,
    start_fake_clopos,
    worker_env,
    write_credentials,
)

ROOT = Path(__file__).resolve().parent.parent
BRAND = "openapitest"
CREDS = {BRAND: ("client-openapitest", "secret-openapitest-0001")}
INTEGRATOR = "fake-integrator"


@dataclass
class System:
    directory: Path
    server: RedisServer
    fake: FakeClopos
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, name: str, concurrency: int, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            {**self.env, **env},
            self.directory / f"{name}.log",
            name=name,
            concurrency=concurrency,
            cwd=ROOT,
        )
        self.workers.append(worker)
        return worker.start()


@contextmanager
def system(**fake_options: Any) -> Iterator[System]:
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        directory = Path(tmp)
        server = RedisServer(directory, secrets.token_urlsafe(16))  # persistent (AOF)
        server.start()
        fake = start_fake_clopos(CREDS, integrator_id=INTEGRATOR, **fake_options)
        env = worker_env(
            redis_url=server.url,
            clopos_url=str(fake.base_url),
            integrator_id=INTEGRATOR,
            credentials_file=write_credentials(directory / "c.json", CREDS),
            settings={"FISCAL_LOG_LEVEL": "WARNING"},
        )
        running = System(directory, server, fake, env)
        try:
            yield running
        finally:
            for worker in running.workers:
                worker.stop()
            fake.stop()
            server.stop()
