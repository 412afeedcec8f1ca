"""The Celery app's settings: JSON only, at-least-once, TLS for rediss:// brokers."""

import ssl
import subprocess
import sys

from support import ROOT

from worker.app import broker_ssl


def test_rediss_broker_verifies_certificates_by_default():
    assert broker_ssl("rediss://:pw@redis.example:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl("rediss://redis.example:6380/0?ssl_cert_reqs=CERT_NONE") is None
    assert broker_ssl("redis://localhost:6379/0") is None


def test_app_is_json_only_and_at_least_once():
    code = (
        "from worker.app import app; c = app.conf; "
        "print(c.accept_content, c.task_serializer, c.task_acks_late, c.task_reject_on_worker_lost,"
        " c.worker_prefetch_multiplier, c.worker_send_task_events, bool(c.broker_use_ssl))"
    )
    env = {"FISCAL_REDIS_URL": "rediss://:pw@redis.example:6380/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["['json']", "json", "True", "True", "1", "True", "True"]


def test_client_secrets_and_the_redis_password_are_masked_in_every_log_line(tmp_path):
    import json

    from worker.logs import redact
    from worker.redis_conn import redis_client, reset_clients
    from worker.settings import Settings, load_credentials_file

    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"b1": {"client_id": "c", "client_secret": "s3cr3t-value-77"}}))
    load_credentials_file(creds)
    redis_client(Settings(redis_url="redis://:redis-pw-9911@127.0.0.1:1/0"))
    reset_clients()
    line = redact("auth with s3cr3t-value-77 at redis://:redis-pw-9911@host")
    assert "s3cr3t-value-77" not in line and "redis-pw-9911" not in line
