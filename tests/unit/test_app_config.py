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


def test_publish_sends_the_registered_task_by_name_with_ids_only():
    """The worker package publishes by name; the message lands on the one queue, carries
    ids only, and its name is the task tasks/fiscalise.py registers."""
    code = """
import json
from worker.app import QUEUE, TASK_NAME, app, publish
app.conf.broker_url = "memory://"
publish("1700000000000-0", 3, "openapitest", "42")
with app.connection_for_read() as conn:
    message = conn.SimpleQueue(QUEUE).get(timeout=5)
    import tasks.fiscalise
    print(json.dumps({
        "name": message.headers["task"], "id": message.headers["id"],
        "ignore_result": message.headers["ignore_result"],
        "body": message.decode()[:2], "type": message.content_type,
        "registered": tasks.fiscalise.fiscalise.name == TASK_NAME,
    }))
"""
    env = {"FISCAL_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    import json

    sent = json.loads(out)
    assert sent == {
        "name": "fiscal.fiscalise",
        "id": "1700000000000-0",
        "ignore_result": True,
        "body": [["1700000000000-0", 3], {"brand": "openapitest", "receipt_id": 42}],
        "type": "application/json",
        "registered": True,
    }
