"""The liveness and readiness probes (worker/health.py): a hung loop fails liveness even
while the process and its heartbeat live; Redis being away fails readiness only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from worker import health


@pytest.fixture
def pulse(tmp_path, clock):
    return health.Pulse(str(tmp_path / "health.json"), clock=clock)


def all_loops_mark(pulse: health.Pulse) -> None:
    for loop in health.LOOPS:
        pulse.mark(loop)


def test_a_worker_whose_loops_all_progress_is_live_and_with_redis_ready(pulse, clock):
    all_loops_mark(pulse)
    pulse.redis_answered()
    pulse.write()
    assert health.probe(pulse.path, ready=False, now=clock() + 5) is None
    assert health.probe(pulse.path, ready=True, now=clock() + 5) is None


def test_one_stuck_loop_fails_liveness_though_the_file_is_fresh(pulse, clock):
    all_loops_mark(pulse)
    clock.now += health.LIVE_SECONDS + 1
    for loop in health.LOOPS:
        if loop != "ingest":
            pulse.mark(loop)
    pulse.write()  # the heartbeat goes on
    problem = health.probe(pulse.path, ready=False, now=clock())
    assert problem is not None and "ingest loop" in problem


def test_a_hung_heartbeat_leaves_the_file_stale_and_fails_liveness(pulse, clock):
    all_loops_mark(pulse)
    pulse.write()
    problem = health.probe(pulse.path, ready=False, now=clock() + health.LIVE_SECONDS + 1)
    assert problem is not None and "not written" in problem


def test_redis_away_fails_readiness_but_not_liveness(pulse, clock):
    all_loops_mark(pulse)
    pulse.redis_answered()
    clock.now += health.READY_REDIS_SECONDS + 1
    all_loops_mark(pulse)  # failed iterations are still iterations
    pulse.write()
    assert health.probe(pulse.path, ready=False, now=clock()) is None
    assert "Redis" in (health.probe(pulse.path, ready=True, now=clock()) or "")


def test_a_loop_not_started_yet_has_had_since_the_start(pulse, clock):
    pulse.write()
    assert health.probe(pulse.path, ready=False, now=clock() + 10) is None
    pulse.write()
    late = clock() + health.LIVE_SECONDS + 1
    assert "loop" in (
        health.check(json.loads(Path(pulse.path).read_text()), late, ready=False) or ""
    )


def test_a_warm_shutdown_stays_live_until_its_bound(pulse, clock):
    all_loops_mark(pulse)
    pulse.stop()
    assert health.probe(pulse.path, ready=False, now=clock() + 200) is None
    assert health.probe(pulse.path, ready=True, now=clock() + 1) is not None
    assert health.probe(pulse.path, ready=False, now=clock() + health.STOPPING_SECONDS + 1)


def test_a_slow_configured_heartbeat_gets_three_beats(tmp_path, clock):
    pulse = health.Pulse(str(tmp_path / "h.json"), beat_seconds=100, clock=clock)
    all_loops_mark(pulse)
    pulse.write()
    assert health.probe(pulse.path, ready=False, now=clock() + 250) is None
    assert health.probe(pulse.path, ready=False, now=clock() + 301) is not None


@pytest.mark.parametrize("content", [None, "", "{not json", "[]", '{"written": "x"}'])
def test_a_missing_or_unreadable_file_is_not_live(tmp_path, content):
    path = tmp_path / "health.json"
    if content is not None:
        path.write_text(content)
    assert health.probe(str(path), ready=False) is not None


def test_the_write_replaces_the_file_whole(pulse):
    pulse.write()
    pulse.write()
    files = sorted(p.name for p in Path(pulse.path).parent.iterdir())
    assert files == ["health.json"]  # no temporary file left behind
    assert json.loads(Path(pulse.path).read_text())["pid"] > 0


def probe_cli(env_file: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", *args],
        env={"FISCAL_HEALTH_FILE": env_file, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_probe_command_exits_0_1_2_with_one_line(tmp_path):
    path = str(tmp_path / "health.json")
    pulse = health.Pulse(path)
    all_loops_mark(pulse)
    pulse.redis_answered()
    pulse.write()
    assert probe_cli(path, "live").returncode == 0
    assert probe_cli(path, "ready").returncode == 0
    assert probe_cli(path, "live", "--within", "30").returncode == 0
    missing = probe_cli(str(tmp_path / "none.json"), "live")
    assert missing.returncode == 1 and missing.stderr.startswith("not live: no health file")
    assert probe_cli(path, "alive").returncode == 2
    assert probe_cli(path, "live", "--within", "soon").returncode == 2


def test_celerys_consumer_waiting_for_redis_is_not_a_hang(pulse, clock):
    all_loops_mark(pulse)
    pulse.redis_answered()
    clock.now += health.LIVE_SECONDS + 60  # Redis away: the consumer reconnects, unmarked
    for loop in health.LOOPS:
        if loop != "consumer":
            pulse.mark(loop)  # the guarded loops go on
    pulse.write()
    assert health.probe(pulse.path, ready=False, now=clock()) is None
    assert "Redis" in (health.probe(pulse.path, ready=True, now=clock()) or "")
    pulse.redis_answered()  # Redis is back: now the consumer must move again
    pulse.write()
    problem = health.probe(pulse.path, ready=False, now=clock())
    assert problem is not None and "consumer loop" in problem


def test_readiness_gives_a_slow_configured_heartbeat_three_beats_too(tmp_path, clock):
    pulse = health.Pulse(str(tmp_path / "h.json"), beat_seconds=60, clock=clock)
    all_loops_mark(pulse)
    pulse.redis_answered()
    clock.now += 150  # two and a half beats since Redis last answered
    all_loops_mark(pulse)
    pulse.write()
    assert health.probe(pulse.path, ready=True, now=clock()) is None
    assert health.probe(pulse.path, ready=True, now=clock() + 31) is not None
