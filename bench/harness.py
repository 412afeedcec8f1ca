"""What every benchmark runs on: a private redis-server, the fake Clopos API with one brand,
and real `celery worker` processes configured through the environment, all stopped at exit."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import RedisServer, WorkerProcess, write_credentials

from worker.fake_clopos import FakeClopos

BRAND = "openapitest"
CREDS = {BRAND: ("client-openapitest", "secret-openapitest-0001")}


@dataclass
class System:
    directory: Path
    server: RedisServer
    fake: FakeClopos
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, name: str, concurrency: int, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            {**self.env, **env}, self.directory / f"{name}.log", name=name, concurrency=concurrency
        )
        self.workers.append(worker)
        return worker.start()


@contextmanager
def system(**fake_options: Any) -> Iterator[System]:
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        directory = Path(tmp)
        server = RedisServer(directory)
        server.start()
        fake = FakeClopos(
            integrator_id="fake-integrator",
            brands={BRAND: {"client_id": CREDS[BRAND][0], "client_secret": CREDS[BRAND][1]}},
            **fake_options,
        )
        fake.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FISCAL_")}
        env.update(
            FISCAL_REDIS_URL=server.url,
            FISCAL_CLOPOS_BASE_URL=str(fake.base_url),
            FISCAL_CLOPOS_INTEGRATOR_ID="fake-integrator",
            FISCAL_CLOPOS_CREDENTIALS_FILE=str(write_credentials(directory / "c.json", CREDS)),
            FISCAL_LOG_LEVEL="WARNING",
        )
        running = System(directory, server, fake, env)
        try:
            yield running
        finally:
            for worker in running.workers:
                worker.stop()
            fake.stop()
            server.stop()
