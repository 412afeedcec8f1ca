"""Flower, started the documented way (`celery -A worker.app flower`, docs/flower.md), behind
basic auth, against a real redis-server and worker: it lists the fiscalise tasks with
readable arguments and no secret, shows a parked result as RETRY with its reason and a
dead-lettered one as FAILURE with its reason; and in a real browser (headless chromium) its
tasks page shows them too. FISCAL_UPDATE_SCREENSHOT=1 copies that page's screenshot to
docs/flower-tasks.png (done by hand when the page changes, never by a normal run)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import httpx
import pytest
from browser import Browser, BrowserError, check_png, find_chromium
from integration.conftest import BRANDS
from support import REDIS_PASSWORD, ROOT, closed, dlq_entries, free_port, patches, wait_for, xadd

from worker import keys

B = "openapitest"
USER, PASSWORD = "ops", "flower-pw-9"
AUTH = (USER, PASSWORD)
# The tasks page's columns, as docs/flower.md starts Flower (Flower's default has no args).
COLUMNS = "name,uuid,state,kwargs,exception,result,received,args,runtime,worker"
# What each result of the scenario ends as in Flower; "parked" keeps being retried.
EXPECTED = {"fiscalised": "SUCCESS", "retried": "SUCCESS", "parked": "RETRY", "dead": "FAILURE"}
RECEIPTS = {"fiscalised": (B, 61), "retried": (B, 63), "parked": (B, 64), "dead": ("nobody", 62)}
SCREEN = (1920, 640)
DOCS_SCREENSHOT = ROOT / "docs" / "flower-tasks.png"


@pytest.fixture
def flower(env, tmp_path):
    """Flower on a free port; the credentials come from the environment, as a Secret gives
    them to a pod (on the command line `ps` would show them)."""
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--tasks-columns={COLUMNS}"],
            env={**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthcheck", timeout=1).status_code in (200, 401)
        except httpx.HTTPError:
            return process.poll() is not None  # exited: reported below

    wait_for(up, timeout=30, what="flower listening")
    assert process.poll() is None, log_path.read_text(errors="replace")
    yield base
    process.terminate()
    process.wait(10)


def run_scenario(r, fake, start_worker) -> dict[str, str]:
    """Four results, each ending in one of Flower's states (EXPECTED); their rids (= task ids).

    fiscalised  closed receipt: PATCHed at once
    retried     its first GET answers 503: parked (RETRY), then PATCHed
    parked      receipt still open: parked again and again (not-ready window long enough)
    dead        brand without credentials: dead-lettered unknown_brand
    """
    fake.add_receipt(B, closed(61))
    fake.add_receipt(B, closed(63))
    fake.fail_next(B, 63, 503, method="GET")
    fake.add_receipt(B, closed(64, status=1, closed_at=None))
    start_worker(
        FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="300", FISCAL_NOT_READY_MAX_DELAY_SECONDS="2"
    )
    return {
        "fiscalised": xadd(r, {"receipt_id": 61, "brand": B, "fiscal_id": "F-61"}),
        "retried": xadd(r, {"receipt_id": 63, "brand": B, "fiscal_id": "F-63"}),
        "parked": xadd(r, {"receipt_id": 64, "brand": B, "fiscal_id": "F-64"}),
        "dead": xadd(r, {"receipt_id": 62, "brand": "nobody", "fiscal_id": "F-62"}),
    }


def api(base: str, path: str) -> Any:
    reply = httpx.get(f"{base}{path}", auth=AUTH, timeout=5)
    assert reply.status_code == 200, (path, reply.status_code, reply.text[:300])
    return reply.json()


def table(base: str, search: str) -> list[dict[str, Any]]:
    """The rows the tasks page's table loads (its XHR) for this search."""
    reply = httpx.post(
        f"{base}/tasks/datatable",
        auth=AUTH,
        data={"draw": 1, "start": 0, "length": 15, "order[0][column]": 0,
              "order[0][dir]": "desc", "columns[0][data]": "received", "search[value]": search},
        timeout=5,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text[:300]
    assert "searchError" not in reply.json(), reply.json()
    return reply.json()["data"]


def settled(base: str, rids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Flower's tasks once each result shows its EXPECTED state (the parked one cycles
    RETRY -> RECEIVED -> STARTED -> RETRY as it is tried again: polled until RETRY)."""

    def shown() -> dict[str, dict[str, Any]] | None:
        found = api(base, "/api/tasks")
        states = {k: found.get(rid, {}).get("state") for k, rid in rids.items()}
        return found if states == EXPECTED else None

    return wait_for(shown, timeout=30, interval=0.1, what=f"flower shows {EXPECTED}")


def secrets(r, fake) -> dict[str, str]:
    """Every secret of the deployment that Flower could show."""
    cached = r.get(keys.token(B))
    assert cached, "the brand's token is not in Redis: the scenario made no API call?"
    found = {f"client_secret {b}": secret for b, (_cid, secret) in BRANDS.items()}
    found |= {"token from Redis": json.loads(cached)["token"], "redis password": REDIS_PASSWORD}
    found |= {f"token #{n}": token for n, token in enumerate(fake.issued_tokens())}
    found["flower password"] = PASSWORD
    return found


def leaks(texts: dict[str, str], secret_texts: dict[str, str]) -> list[str]:
    return [
        f"{name} in {where}"
        for where, text in texts.items()
        for name, secret in secret_texts.items()
        if secret in text
    ]


def test_flower_api_shows_tasks_retries_dead_letters_behind_auth(r, fake, start_worker, flower):
    for path in ("/api/tasks", "/tasks", "/api/workers", "/broker"):
        assert httpx.get(f"{flower}{path}", timeout=5).status_code == 401, path
    wrong = httpx.get(f"{flower}/api/tasks", auth=(USER, "wrong"), timeout=5)
    assert wrong.status_code == 401

    rids = run_scenario(r, fake, start_worker)
    tasks = settled(flower, rids)
    info = {k: api(flower, f"/api/task/info/{rid}") for k, rid in rids.items()}
    assert httpx.get(f"{flower}/api/task/info/{rids['dead']}", timeout=5).status_code == 401

    # Readable arguments: [rid, dispatch number] and {brand, receipt_id}; nothing else.
    for k, rid in rids.items():
        task = info[k]
        assert task["name"] == "fiscal.fiscalise" and task["uuid"] == rid, task
        assert task["state"] in (EXPECTED[k], "RECEIVED", "STARTED"), (k, task["state"])
        args, kwargs = ast.literal_eval(task["args"]), ast.literal_eval(task["kwargs"])
        assert args[0] == rid and isinstance(args[1], int) and len(args) == 2, args
        brand, receipt_id = RECEIPTS[k]
        assert kwargs == {"brand": brand, "receipt_id": receipt_id}, kwargs
        assert tasks[rid]["kwargs"] == task["kwargs"]

    # SUCCESS: fiscalised, at once or after a retry (which Flower remembers).
    fiscalised = info["fiscalised"]
    assert "fiscalised" in fiscalised["result"] and fiscalised["retried"] is None
    retried = info["retried"]
    assert "fiscalised" in retried["result"] and retried["retried"] is not None
    assert "Parked(" in retried["exception"] and "HTTP 503" in retried["exception"]
    assert [p["fiscal_id"] for p in patches(fake, B, 61) + patches(fake, B, 63)] == [
        "F-61",
        "F-63",
    ]

    # RETRY: parked in the schedule; the exception says until when and why.
    parked = wait_for(
        lambda: (t := api(flower, f"/api/task/info/{rids['parked']}"))["state"] == "RETRY" and t,
        timeout=10,
        interval=0.1,
        what="the parked result shown as RETRY",
    )
    assert parked["exception"].startswith("Parked('parked until "), parked["exception"]
    assert "receipt is not closed yet" in parked["exception"]
    assert parked["retried"] is not None and parked["result"] is None

    # FAILURE: dead-lettered; the exception names the reason and the dead-letter entry.
    [entry] = dlq_entries(r)
    assert entry["result_id"] == rids["dead"] and entry["reason"] == "unknown_brand"
    dead = info["dead"]
    assert dead["state"] == "FAILURE" and dead["failed"] is not None
    assert dead["exception"].startswith(f'DeadLettered("unknown_brand dlq_id={entry["id"]}:')

    # The table's search finds a receipt, a brand, a state.
    for query, kinds in [
        ("kwargs:receipt_id=64", ["parked"]),
        ("kwargs:brand=nobody", ["dead"]),
        ("state:FAILURE", ["dead"]),
        ("kwargs:brand=openapitest state:SUCCESS", ["fiscalised", "retried"]),
    ]:
        assert sorted(t["uuid"] for t in table(flower, query)) == sorted(rids[k] for k in kinds)

    # No secret anywhere Flower shows things.
    texts = {
        "/api/tasks": json.dumps(api(flower, "/api/tasks")),
        "/api/task/info": json.dumps(info | {"parked again": parked}),
        "/api/workers": json.dumps(api(flower, "/api/workers?refresh=1")),
    }
    for page in ("/tasks", "/workers", "/broker", f"/task/{rids['dead']}"):
        reply = httpx.get(f"{flower}{page}", auth=AUTH, timeout=5)
        assert reply.status_code == 200, page
        texts[page] = reply.text
    every = table(flower, "")
    assert sorted(t["uuid"] for t in every) == sorted(rids.values())
    texts["/tasks/datatable"] = json.dumps(every)
    found = leaks(texts, secrets(r, fake))
    assert not found, found


# The tasks table's rows as {row id (= task id): {column: text}}. With scrollX DataTables
# clones the header row, so each column is named by its first header cell.
ROWS_JS = """(() => {
  const names = [...document.querySelectorAll('th[data-column]')].map(th => th.dataset.column);
  const columns = names.slice(0, new Set(names).size);
  const rows = document.querySelectorAll('#tasks-table tbody tr[id]');
  return Object.fromEntries([...rows].map(tr => [tr.id, Object.fromEntries(
    [...tr.cells].map((td, i) => [columns[i], td.innerText.trim()]))]));
})()"""


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): no real browser")
    return binary


def test_flower_tasks_page_in_headless_chromium(chromium, r, fake, start_worker, flower, tmp_path):
    rids = run_scenario(r, fake, start_worker)
    settled(flower, rids)
    # Basic auth as a person gives it: the browser meets the 401 challenge and answers with
    # these credentials, for the page and for the table's own XHR.
    url = flower.replace("http://", f"http://{USER}:{PASSWORD}@", 1) + "/tasks"
    with Browser(chromium, tmp_path / "chromium", *SCREEN) as page:
        try:  # without credentials: chromium gives up on the challenge (it has no prompt)
            page.goto(f"{flower}/tasks")
            refused = page.js("document.querySelector('#tasks-table') === null")
        except BrowserError as exc:
            refused = "AUTH" in str(exc)  # net::ERR_INVALID_AUTH_CREDENTIALS
        assert refused, "the tasks page opened without credentials"
        page.goto(url)

        def table_shows_all() -> dict[str, dict[str, str]] | None:
            rows = page.js(ROWS_JS) or {}
            if all(rows.get(rid, {}).get("state") == EXPECTED[k] for k, rid in rids.items()):
                return rows
            # The page does not refresh by itself; the parked task may have been caught
            # between two tries (RECEIVED, STARTED): load the table again.
            page.js("$('#tasks-table').DataTable().ajax.reload(null, false), true")
            return None

        rows = wait_for(table_shows_all, timeout=20, interval=0.5, what="the tasks table")
        html = page.js("document.documentElement.outerHTML")
        png = page.screenshot()

    for k, rid in rids.items():
        row = rows[rid]
        assert row["name"] == "fiscal.fiscalise" and row["uuid"] == rid, row
        brand, receipt_id = RECEIPTS[k]
        assert ast.literal_eval(row["kwargs"]) == {"brand": brand, "receipt_id": receipt_id}
        assert ast.literal_eval(row["args"])[0] == rid, row
    assert "unknown_brand dlq_id=dl-" in rows[rids["dead"]]["exception"]
    assert "receipt is not closed yet" in rows[rids["parked"]]["exception"]
    assert "fiscalised" in rows[rids["fiscalised"]]["result"]
    found = leaks({"the tasks page": html}, secrets(r, fake))
    assert not found, found

    shot = tmp_path / "flower-tasks.png"
    shot.write_bytes(png)
    check_png(png, *SCREEN)
    if os.environ.get("FISCAL_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    assert DOCS_SCREENSHOT.exists(), "docs/flower-tasks.png is missing"
