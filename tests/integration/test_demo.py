"""`fiscal-worker demo` end to end, as `make demo` runs it: a subprocess without FISCAL_*
settings, both embedded brokers, a summary that adds up, and nothing left running after."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import ROOT, wait_for

from worker.testing import clean_env

DEMO_TIMEOUT = 120
EXPECTED_REASONS = ("invalid_message", "unknown_brand", "fiscal_id_conflict", "receipt_not_found")


def demo_env() -> dict[str, str]:
    return clean_env()


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "demo", *args]


def demo_dir(output: str) -> str:
    match = re.search(r"^demo dir: (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (this test's own excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_nothing_left(output: str) -> None:
    """No process with the demo dir on its command line (the worker and its pool children
    have their log file there, redis-server its config), none of the pids it printed."""
    directory = demo_dir(output)
    pids = [int(pid) for pid in re.findall(r"\bpid (\d+)", output)]
    assert pids, output
    wait_for(
        lambda: not processes_mentioning(directory) and not any(alive(p) for p in pids),
        timeout=5,
        what="no demo process left",
    )
    assert not Path(directory).exists(), f"demo dir {directory} was not removed"


def run_demo(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        demo_command(*args),
        env=demo_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    return done, time.monotonic() - started


def assert_successful_run(done: subprocess.CompletedProcess[str], elapsed: float) -> None:
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    assert "exactly-once check: OK" in out, out
    assert "outcomes as planned: yes" in out, out
    for reason in EXPECTED_REASONS:
        match = re.search(rf"^\s+{reason}\s+(\d+)\s+planned (\d+)$", out, re.MULTILINE)
        assert match, f"no dead-lettered count for {reason}:\n{out}"
        assert int(match.group(1)) == int(match.group(2)) >= 1, match.group(0)
    # `fiscal-worker dlq stats`, run by the demo as a subprocess, printed its table.
    stats = out.split("$ fiscal-worker dlq stats", 1)[1].split("$ fiscal-worker dlq list", 1)[0]
    assert re.search(r"total:\s+\d+", stats), stats
    for reason in EXPECTED_REASONS:
        assert re.search(rf"^\s+{reason}\s+\d+$", stats, re.MULTILINE), stats
    assert "fiscal-worker dlq show dl-" in out
    # The embedded Redis has a random password; it is never printed without --keep.
    assert "redis://:***@127.0.0.1:" in out
    assert not re.search(r"redis://:(?!\*\*\*@)", out + done.stderr)
    assert_nothing_left(out)


def test_demo_runs_the_whole_system_and_leaves_nothing_behind() -> None:
    done, elapsed = run_demo()
    assert_successful_run(done, elapsed)
    kind = "redis-server" if shutil.which("redis-server") else "fakeredis"
    assert f"redis: {kind} at " in done.stdout


def test_demo_works_on_the_fakeredis_fallback() -> None:
    done, elapsed = run_demo("--redis", "fakeredis")
    assert_successful_run(done, elapsed)
    assert "redis: fakeredis at " in done.stdout


def test_sigterm_mid_run_stops_everything(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            demo_command(), env=demo_env(), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "adapter: sending" in output.read_text(), timeout=60, what="demo running")
        assert processes_mentioning(demo_dir(output.read_text())), "the worker should be running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 130, output.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert "interrupted; stopping everything" in output.read_text()
    assert_nothing_left(output.read_text())


def test_demo_web_serves_the_console_on_the_demo_until_enter(tmp_path: Path) -> None:
    """`demo --web`: after the summary the console runs on the demo's Redis; the printed
    one-time password logs in, its dead-letter page lists the demo's dead letters, and Enter
    stops everything, the console too."""
    import httpx

    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            demo_command("--web"), env=demo_env(), cwd=ROOT, stdin=subprocess.PIPE,
            stdout=sink, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        line = re.compile(
            r"^console: (http://127\.0\.0\.1:\d+)/  "
            r"\(user admin, one-time password (\S+)\)$",
            re.M,
        )
        wait_for(lambda: line.search(output.read_text()), timeout=DEMO_TIMEOUT, what="console")
        found = line.search(output.read_text())
        assert found is not None
        base, password = found.group(1), found.group(2)
        with httpx.Client(base_url=base, follow_redirects=True, timeout=10) as client:
            page = client.get("/dead-letters")
            assert page.url.path == "/login"
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            answer = client.post(
                "/login", data={"csrf": token.group(1), "user": "admin", "password": password,
                                "next": "/dead-letters"},
            )  # fmt: skip
            assert answer.status_code == 200 and answer.url.path == "/dead-letters"
            assert len(re.findall(r'<tr data-id="dl-\d+"', answer.text)) >= len(EXPECTED_REASONS)
            for reason in EXPECTED_REASONS:
                assert reason in answer.text
        assert password not in output.read_text().split("console:", 1)[0]  # printed once
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = output.read_text()
    assert "console" in out.split("stopped and removed:", 1)[1]
    assert_nothing_left(out)
    try:
        httpx.get(f"{base}/healthz", timeout=2)
    except httpx.HTTPError:
        pass
    else:
        raise AssertionError("the console still answers after the demo stopped")
