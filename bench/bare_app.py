"""The bare Celery baseline: the same Celery settings as worker/app.py, one task that does what
a fiscalisation needs on the wire (GET the receipt, PATCH fiscal_id + lock) and nothing else:
no receipt lock, marker, audit trail, rate budget, schedule or ingest stream.

    BENCH_BROKER_URL=redis://... BENCH_API_URL=http://... BENCH_CREDENTIALS_FILE=c.json \\
        celery -A bench.bare_app worker --pool prefork -c 2

One httpx.Client per process, one token per brand and process (fetched on first use), so
it costs what any Celery task calling the API would. bench/throughput.py runs it beside the
worker against the same Redis and stand-in API (bench/standin.py).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from celery import Celery

from worker import broker

TASK_NAME = "bare.fiscalise"
QUEUE = "bare"

# These mirror worker/app.py (importing it would connect its signals and bootsteps to this
# app's worker too); `drift()` compares them with every setting worker/app.py sets, and
# bench/throughput.py refuses to measure if they differ. The broker transport is the
# worker's too (worker/broker.py: kombu's, one Redis client per channel, installed below):
# what any Celery app can use, so the comparison is of what runs on top of it.
MIRRORED = {
    "broker_connection_retry_on_startup": True,
    "broker_transport_options": {"visibility_timeout": 3600},
    "task_serializer": "json",
    "result_serializer": "json",
    "event_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": True,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "worker_max_tasks_per_child": 10_000,
    "worker_max_memory_per_child": 200 * 1024,
    "worker_send_task_events": True,
    "task_send_sent_event": True,
    "task_soft_time_limit": 150,
    "task_time_limit": 180,
    "worker_cancel_long_running_tasks_on_connection_loss": False,
    "worker_hijack_root_logger": True,
}
# Set by worker/app.py for its own deployment, not mirrored: where the broker is (and its
# TLS), and which queue is the worker's (the baseline has its own).
NOT_MIRRORED = frozenset({"broker_url", "broker_use_ssl", "task_default_queue"})
# The wire's timeouts and pool, as worker/clopos/wire.py sets them.
HTTP_TIMEOUT = httpx.Timeout(12.0, connect=5.0)
HTTP_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=10)

broker.install()
app = Celery("bare")
app.conf.update(
    MIRRORED,
    broker_url=os.environ.get("BENCH_BROKER_URL", "redis://localhost:6379/0"),
    task_default_queue=QUEUE,
)

# httpx logs every request at INFO; the worker quiets it too (worker/logs.py).
logging.getLogger("httpx").setLevel(logging.WARNING)

_lock = threading.Lock()  # the threads pool shares the client and the tokens
_http: httpx.Client | None = None
_tokens: dict[str, str] = {}


def _client() -> httpx.Client:
    global _http
    with _lock:
        if _http is None:
            _http = httpx.Client(
                base_url=os.environ["BENCH_API_URL"],
                timeout=HTTP_TIMEOUT,
                limits=HTTP_LIMITS,
                headers={"accept": "application/json", "user-agent": "bare-celery/0.1"},
            )
        return _http


def _token(http: httpx.Client, brand: str) -> str:
    with _lock:
        token = _tokens.get(brand)
        if token is None:
            with open(os.environ["BENCH_CREDENTIALS_FILE"], encoding="utf-8") as file:
                creds = json.load(file)[brand]
            body = {
                "client_id": creds["client_id"],
                "client_secret": creds["client_secret"],
                "brand": brand,
                "integrator_id": os.environ.get("BENCH_INTEGRATOR_ID", "bench-integrator"),
            }
            answer = http.post("/v2/auth", json=body)
            answer.raise_for_status()
            token = _tokens[brand] = str(answer.json()["token"])
        return token


@app.task(name=TASK_NAME)
def fiscalise(brand: str, receipt_id: int, fiscal_id: str) -> None:
    http = _client()
    headers = {"x-token": _token(http, brand)}
    path = f"/v2/receipts/{int(receipt_id)}"
    http.get(path, headers=headers).raise_for_status()
    http.patch(
        path, json={"fiscal_id": fiscal_id, "lock": True}, headers=headers
    ).raise_for_status()


def enqueue(broker_url: str, jobs: Iterable[tuple[str, int, str]]) -> int:
    """Put one task per (brand, receipt_id, fiscal_id) on the queue; returns how many."""
    sent = 0
    with app.connection_for_write(broker_url) as connection:
        producer = app.amqp.Producer(connection)
        for brand, receipt_id, fiscal_id in jobs:
            app.send_task(TASK_NAME, args=[brand, receipt_id, fiscal_id], producer=producer)
            sent += 1
    return sent


def worker_setting_names() -> set[str]:
    """The settings worker/app.py sets in its `app.conf.update(...)` (read from its source)."""
    spec = importlib.util.find_spec("worker.app")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    return {
        keyword.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "update"
        and ast.unparse(node.func.value) == "app.conf"
        for keyword in node.keywords
        if keyword.arg is not None
    }


def drift(worker_conf: Any) -> dict[str, tuple[Any, Any]]:
    """Every setting worker/app.py sets (but those of its own deployment) whose value here
    differs from `worker_conf` (worker.app's app.conf): {name: (ours, the worker's)}."""
    missing = object()
    names = (worker_setting_names() - NOT_MIRRORED) | set(MIRRORED)
    return {
        name: (MIRRORED.get(name, missing), worker_conf.get(name))
        for name in sorted(names)
        if MIRRORED.get(name, missing) != worker_conf.get(name)
    }
