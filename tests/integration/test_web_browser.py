"""The operator's console (`fiscal-worker web`, worker/web/) in a real browser (headless
chromium), against a real redis-server, a real worker and the fake Clopos API over HTTP: an
operator logs in through the login form, filters the dead letters by reason, opens an entry
whose receipt has since been fixed in Clopos, replays it, and sees the entry leave the list
and the receipt show `fiscalised` in the lookup; Clopos got exactly one PATCH for it, and the
operator log names the replay and its user. Screenshots of the overview and the dead-letter
page are checked and kept in tmp_path; FISCAL_UPDATE_SCREENSHOT=1 also copies them to
docs/console/ (done by hand when the pages change, never by a normal run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import Browser, BrowserError, check_png, find_chromium
from support import ROOT, closed, dlq_entries, free_port, patches, wait_finished, wait_for, xadd

B = "openapitest"
USER, PASSWORD = "op", "console-pw-4242"
FIXED, MISSING, CONFLICT, DONE = 71, 72, 73, 74  # receipt ids of the scenario
SCREEN = (1400, 900)
DOCS = ROOT / "docs" / "console"
SCREENSHOTS = {"overview": DOCS / "overview.png", "dead-letters": DOCS / "dead-letters.png"}


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): no real browser")
    return binary


@pytest.fixture
def console(env: dict[str, str], tmp_path: Path):
    """`fiscal-worker web` on a free port, its one operator made with `fiscal-worker
    web-user` (the password on stdin), as docs and the deployment do."""
    users = tmp_path / "web-users.json"
    made = subprocess.run(
        [sys.executable, "-m", "worker.cli", "web-user", USER, "--role", "operator",
         "--file", str(users), "--password-stdin"],
        env=env, cwd=ROOT, input=f"{PASSWORD}\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    port = free_port()
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "web", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "FISCAL_WEB_USERS_FILE": str(users)},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None  # exited: reported below

    try:
        wait_for(up, timeout=30, what="the console listening")
        assert process.poll() is None, log_path.read_text(errors="replace")
        yield base
    finally:
        process.terminate()
        process.wait(10)


def dead_letter_scenario(r, fake, start_worker) -> dict[str, Any]:
    """Dead letters of four reasons, and one result fiscalised at once; then the receipt of
    one `receipt_not_found` entry appears in Clopos, closed (the fix to replay). Returns
    that entry."""
    fake.add_receipt(B, closed(CONFLICT, fiscal_id="THEIRS", lock=True))
    fake.add_receipt(B, closed(DONE))
    start_worker(FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="2")
    xadd(r, {"receipt_id": DONE, "brand": B, "fiscal_id": "F-74"})
    xadd(r, {"receipt_id": FIXED, "brand": B, "fiscal_id": "F-71", "device_id": "printer-1"})
    xadd(r, {"receipt_id": MISSING, "brand": B, "fiscal_id": "F-72"})
    xadd(r, {"receipt_id": CONFLICT, "brand": B, "fiscal_id": "OURS"})
    xadd(r, {"receipt_id": 75, "brand": "nobody", "fiscal_id": "F-75"})
    xadd(r, '{"receipt_id": "seventy-six", "brand": ')  # not JSON
    wait_finished(r, timeout=30)
    entries = wait_for(lambda: len(e := dlq_entries(r)) == 5 and e, timeout=10, what="5 DLQ")
    reasons = sorted(e["reason"] for e in entries)
    assert reasons == [
        "fiscal_id_conflict", "invalid_message", "receipt_not_found", "receipt_not_found",
        "unknown_brand",
    ], entries  # fmt: skip
    assert patches(fake, B, FIXED) == []
    fake.add_receipt(B, closed(FIXED))  # the receipt finally synced to Clopos
    [entry] = [e for e in entries if e.get("receipt_id") == FIXED]
    assert entry["reason"] == "receipt_not_found"
    return entry


def navigate(page: Browser, action: str, what: str, timeout: float = 15.0) -> None:
    """Run `action` (a click, a submit) in the page and wait until the page it leads to has
    loaded: the old document is marked, the new one is not."""
    page.js("window.__leaving = true")
    page.js(action)

    def arrived() -> bool:
        try:
            return bool(
                page.js("window.__leaving === undefined && document.readyState === 'complete'")
            )
        except BrowserError:  # between two documents: no context to evaluate in
            return False

    wait_for(arrived, timeout=timeout, interval=0.1, what=what)


def text(page: Browser, element_id: str) -> str | None:
    """The shown text of the element with this id; None when the page has none."""
    return page.js(f"(e => e && e.innerText.trim())(document.getElementById({element_id!r}))")


def rows(page: Browser) -> list[dict[str, str]]:
    """The dead-letter table's entry rows: id, reason, brand, receipt."""
    return page.js(
        """[...document.querySelectorAll('#dead-letters tr[data-id]')].map(tr => ({
             id: tr.dataset.id, reason: tr.cells[2].innerText.trim(),
             brand: tr.cells[3].innerText.trim(), receipt: tr.cells[4].innerText.trim()}))"""
    )


def keep(png: bytes, name: str, tmp_path: Path) -> None:
    check_png(png, *SCREEN)
    shot = tmp_path / f"{name}.png"
    shot.write_bytes(png)
    if os.environ.get("FISCAL_UPDATE_SCREENSHOT") == "1":
        SCREENSHOTS[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOTS[name])


def test_operator_replays_a_fixed_dead_letter_in_the_browser(
    chromium, r, fake, start_worker, console, tmp_path
):
    entry = dead_letter_scenario(r, fake, start_worker)
    with Browser(chromium, tmp_path / "chromium", *SCREEN) as page:
        # 1. Log in: any page sends to the login form, which sends back after it.
        page.goto(f"{console}/")
        assert page.js("location.pathname") == "/login"
        page.js(f"document.getElementById('user').value = {USER!r}")
        page.js(f"document.getElementById('password').value = {PASSWORD!r}")
        navigate(page, "document.getElementById('login').click()", "logged in")
        assert page.js("location.pathname") == "/", page.js("document.body.innerText")
        assert text(page, "who") == f"{USER} · operator"
        assert text(page, "dead-total") == "5"
        page.wait_js("document.getElementById('problems') !== null", what="the problems box")
        keep(page.screenshot(), "overview", tmp_path)

        # The dead letters, every reason: the second screenshot.
        page.goto(f"{console}/dead-letters")
        assert sorted(row["reason"] for row in rows(page)) == sorted(
            e["reason"] for e in dlq_entries(r)
        )
        keep(page.screenshot(), "dead-letters", tmp_path)

        # 2. Filter by reason.
        page.js("document.getElementById('f-reason').value = 'receipt_not_found'")
        navigate(page, "document.getElementById('apply-filter').click()", "the filtered list")
        reason = page.js("new URLSearchParams(location.search).get('reason')")
        assert reason == "receipt_not_found", page.js("location.href")
        shown = rows(page)
        assert {row["reason"] for row in shown} == {"receipt_not_found"}, shown
        assert sorted(row["receipt"] for row in shown) == [str(FIXED), str(MISSING)]

        # 3. Open the entry whose receipt has since been fixed.
        link = f"document.querySelector('tr[data-id=\"{entry['id']}\"] a.entry-link')"
        assert page.js(f"{link} !== null"), shown
        navigate(page, f"{link}.click()", "the entry page")
        assert page.js("location.pathname") == f"/dead-letters/{entry['id']}"
        assert (text(page, "receipt-link") or "").startswith(str(FIXED))

        # 4. Replay it.
        navigate(page, "document.getElementById('replay').click()", "back from the replay")
        assert page.js("location.pathname") == "/dead-letters"
        assert text(page, "flash") == "replayed 1, refused 0", text(page, "flash")

        # 5. The entry has left the list; the receipt is fiscalised in the lookup.
        assert entry["id"] not in {row["id"] for row in rows(page)}
        page.goto(f"{console}/receipts")

        def looked_up() -> bool:
            page.js(f"document.getElementById('r-brand').value = {B!r}")
            page.js(f"document.getElementById('r-receipt').value = '{FIXED}'")
            navigate(page, "document.getElementById('look-up').click()", "the lookup")
            return text(page, "receipt-state") == "fiscalised"

        # The worker takes a moment: look it up again until it shows.
        wait_for(looked_up, timeout=20, interval=0.3, what="the receipt shown fiscalised")
        assert page.js("location.search") == f"?brand={B}&receipt_id={FIXED}"
        assert page.js("document.getElementById('no-dead-letters') !== null")

        # After it settled, no dead letter of that receipt is listed, under any filter.
        wait_finished(r)
        page.goto(f"{console}/dead-letters?reason=receipt_not_found")
        assert [row["receipt"] for row in rows(page)] == [str(MISSING)]
        page.goto(f"{console}/dead-letters")
        assert str(FIXED) not in {row["receipt"] for row in rows(page)}
        assert len(rows(page)) == 4

        # The operator log: the replay, by this user, of this entry.
        page.goto(f"{console}/log")
        log = page.js(
            """[...document.querySelectorAll('#oplog tbody tr')].map(tr =>
                 [...tr.cells].map(td => td.innerText.trim()))"""
        )

    assert patches(fake, B, FIXED) == [{"fiscal_id": "F-71", "lock": True}]
    assert fake.stats()["receipts"][f"{B}:{FIXED}"]["patch"] == 1
    assert fake.receipt(B, FIXED)["fiscal_id"] == "F-71"
    replays = [row for row in log if row[3] == "replay"]
    assert len(replays) == 1, log
    _at, who, via, action, of, count, refused, ids = replays[0]
    assert (who, via, action, count, refused, ids) == (USER, "web", "replay", "1", "0", entry["id"])
    assert entry["id"] in of, of
    for path in SCREENSHOTS.values():
        assert path.exists(), f"{path.relative_to(ROOT)} is missing (FISCAL_UPDATE_SCREENSHOT=1)"
