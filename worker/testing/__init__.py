"""The one harness for running the system locally, shared by the tests, the benchmarks and
the demo: a private redis-server, `celery worker` processes, the fake Clopos API on a free
port (processes.py), the environment they get (env.py), and waiting on a condition.

Importing this package needs only the worker's own dependencies; the fake API (the `demo`
extra) is imported when `start_fake_clopos` is called.
"""

from __future__ import annotations

from worker.testing.env import clean_env, worker_env, write_credentials
from worker.testing.processes import (
    RedisServer,
    StartError,
    WorkerProcess,
    free_port,
    ping,
    start_fake_clopos,
)
from worker.testing.wait import wait_for

__all__ = [
    "RedisServer",
    "StartError",
    "WorkerProcess",
    "clean_env",
    "free_port",
    "ping",
    "start_fake_clopos",
    "wait_for",
    "worker_env",
    "write_credentials",
]
