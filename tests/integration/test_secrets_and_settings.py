"""Secrets never reach logs, Redis (beyond the token cache), the dead-letter store or CLI
output; a bad setting stops a process with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT, closed, run_cli, wait_finished, xadd

from worker import keys

SECRETS = ["secret-openapitest-0001", "secret-brand2-0002"]


def all_redis_values(r) -> str:
    """Every key and value in Redis except the shared token cache, as one text."""
    parts = []
    for key in r.scan_iter(count=1000):
        if key in (keys.token("openapitest"), keys.token("brand2")):
            continue
        kind = r.type(key)
        parts.append(key)
        if kind == "string":
            parts.append(r.get(key))
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in r.hgetall(key).items())
        elif kind == "list":
            parts.extend(r.lrange(key, 0, -1))
        elif kind == "zset":
            parts.extend(r.zrange(key, 0, -1))
        elif kind == "stream":
            parts.extend(str(e) for e in r.xrange(key))
    return "\n".join(parts)


def test_secrets_and_tokens_never_leave_their_place(r, fake, start_worker, env):
    fake.add_receipt("openapitest", closed(51))
    fake.add_receipt("openapitest", closed(52))
    fake.reject_auth("brand2")
    worker = start_worker(FISCAL_LOG_LEVEL="DEBUG")
    xadd(r, {"receipt_id": 51, "brand": "openapitest", "fiscal_id": "F-51"})
    wait_finished(r)
    token = r.get(keys.token("openapitest"))
    assert token, "the token cache key exists and contains 'token'"
    fake.revoke_tokens("openapitest")  # forces a 401 and a second token
    xadd(r, {"receipt_id": 52, "brand": "openapitest", "fiscal_id": "F-52"})
    xadd(r, {"receipt_id": 53, "brand": "brand2", "fiscal_id": "F-53"})  # auth rejected
    wait_finished(r, timeout=60)
    tokens = [r.get(keys.token("openapitest")), token]
    jwts = [t.split('"token": "')[1].split('"')[0] for t in tokens if t]
    assert len(jwts) == 2 and jwts[0] != jwts[1]

    outputs = {
        "worker log": worker.log(),
        "redis (all but the token cache)": all_redis_values(r),
        "dlq list": run_cli(env, "dlq", "list", "--json").stdout,
        "dlq show": run_cli(env, "dlq", "show", "dl-1", "--json").stdout,
        "dlq stats": run_cli(env, "dlq", "stats").stdout,
        "receipt": run_cli(env, "receipt", "openapitest", "52", "--json").stdout,
    }
    assert "auth_failed" in outputs["dlq list"]
    for where, text in outputs.items():
        for secret in [*SECRETS, *jwts, env["FISCAL_REDIS_URL"].split(":")[2].split("@")[0]]:
            assert secret not in text, f"a secret leaked into the {where}"


@pytest.mark.parametrize(
    "variable,value",
    [
        ("FISCAL_REDIS_URL", "http://not-redis"),
        ("FISCAL_CLOPOS_BASE_URL", "ftp://x"),
        ("FISCAL_RATE_LIMIT_REQUESTS", "abc"),
        ("FISCAL_RATE_LIMIT_REQUESTS", "0"),
        ("FISCAL_RATE_LIMIT_WINDOW_SECONDS", "-1"),
        ("FISCAL_NOT_READY_RETRY_WINDOW_SECONDS", "soon"),
        ("FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS", "[]"),
        ("FISCAL_INGEST_STREAM", ""),
        ("FISCAL_CLOPOS_CREDENTIALS_FILE", "/nonexistent/creds.json"),
        ("FISCAL_CLOPOS_INTEGRATOR_ID", ""),
    ],
)
def test_a_bad_setting_stops_the_worker_with_one_line(env, variable, value):
    bad = {**env, variable: value}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO"],
        env=bad, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert variable in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"bad brand!": {"client_id": "a", "client_secret": "b"}}',
        '{"b": {"client_id": "", "client_secret": "x"}}',
        '{"b": {"client_id": "a"}}',
    ],
)
def test_a_bad_credentials_file_stops_the_worker_with_one_line(env, tmp_path, content):
    path = tmp_path / "bad-creds.json"
    path.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker"],
        env={**env, "FISCAL_CLOPOS_CREDENTIALS_FILE": str(path)},
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "FISCAL_CLOPOS_CREDENTIALS_FILE" in lines[0]


def test_dlq_commands_need_no_clopos_credentials(env):
    bare = {k: v for k, v in env.items() if not k.startswith("FISCAL_CLOPOS")}
    proc = run_cli(bare, "dlq", "stats", "--json")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "variable,value",
    [
        ("FISCAL_REDIS_URL", "http://not-redis"),
        ("FISCAL_RATE_LIMIT_REQUESTS", "abc"),
        ("FISCAL_RATE_LIMIT_WINDOW_SECONDS", "0"),
        ("FISCAL_NOT_READY_RETRY_WINDOW_SECONDS", "-5"),
        ("FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS", "x"),
        ("FISCAL_INGEST_STREAM", ""),
        ("FISCAL_DLQ_WARN_ENTRIES", "0"),
        ("FISCAL_ALLOW_EVICTING_REDIS", "maybe"),
        ("FISCAL_RESULT_DEADLINE_SECONDS", "0"),
    ],
)
def test_a_bad_setting_fails_the_cli_with_one_line(env, variable, value):
    proc = run_cli({**env, variable: value}, "dlq", "stats")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
