"""Redis must never evict the worker's state: a worker refuses an evicting maxmemory-policy
(unless the operator opts out, loudly), and `stats` / metrics show the policy."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT, run_cli


def start_celery(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo",
         "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_worker_refuses_an_evicting_policy_with_one_line(r, env):
    r.config_set("maxmemory-policy", "volatile-lru")  # what managed Redis often defaults to
    proc = start_celery(env)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [line for line in output.splitlines() if "fiscal-worker:" in line]
    assert len(lines) == 1 and "maxmemory-policy is volatile-lru" in lines[0]
    assert "Traceback" not in output


def test_an_opted_out_worker_starts_and_says_so_loudly(r, env, start_worker):
    r.config_set("maxmemory-policy", "allkeys-lru")
    worker = start_worker(FISCAL_ALLOW_EVICTING_REDIS="true")
    assert "event=redis_evicting_policy maxmemory_policy=allkeys-lru" in worker.log()
    stats = json.loads(run_cli(env, "stats", "--json").stdout)
    assert stats["redis"]["maxmemory_policy"] == "allkeys-lru" and stats["redis"]["evicting"]
    assert stats["workers"] >= 1
    metrics = run_cli(env, "metrics").stdout
    assert "fiscal_redis_evicting_policy 1.0" in metrics
    text = run_cli(env, "stats").stdout
    assert "maxmemory-policy allkeys-lru" in text and "WARNING" in text


def test_stats_show_noeviction_as_safe(r, env):
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    stats = json.loads(run_cli(env, "stats", "--json").stdout)
    assert stats["redis"]["maxmemory_policy"] == "noeviction"
    assert stats["redis"]["evicting"] is False
    assert "fiscal_redis_evicting_policy 0.0" in run_cli(env, "metrics").stdout
