"""`celery -A worker.app flower` works (docs/interface.md, Install and run), behind basic
auth, and shows our tasks with their states and without secrets."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from support import ROOT, closed, free_port, wait_finished, wait_for, xadd

from worker import keys

B = "openapitest"


@pytest.fixture
def flower(env, tmp_path):
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
         "--address=127.0.0.1", "--basic-auth=ops:flower-pw-9"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthcheck", timeout=1).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=30, what="flower listening")
    yield base
    process.terminate()
    process.wait(10)
    log.close()


def test_flower_shows_tasks_behind_auth_without_secrets(r, fake, start_worker, flower):
    fake.add_receipt(B, closed(61))
    start_worker()
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    xadd(r, {"receipt_id": 61, "brand": B, "fiscal_id": "F-61"})
    xadd(r, {"receipt_id": 62, "brand": "nobody", "fiscal_id": "F-62"})
    wait_finished(r)
    auth = ("ops", "flower-pw-9")

    def tasks() -> dict:
        reply = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5)
        assert reply.status_code == 200
        found = reply.json()
        return found if len(found) >= 2 else {}

    found = wait_for(tasks, timeout=20, what="flower saw both tasks")
    states = sorted(task["state"] for task in found.values())
    assert states == ["FAILURE", "SUCCESS"]
    failed = next(t for t in found.values() if t["state"] == "FAILURE")
    assert "unknown_brand dlq_id=dl-" in failed["exception"]
    text = str(found)
    for secret in ["secret-openapitest-0001", r.get(keys.token("openapitest")) or "no-token"]:
        assert secret not in text
