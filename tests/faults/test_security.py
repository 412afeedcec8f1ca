"""Security: no secret or token text anywhere a person or another system reads (logs, task
messages and events, the dead-letter store, the audit trail, CLI output); a pickled task
message is refused, not executed; Redis with an ACL user, and over TLS (rediss://)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from faults.harness import TlsRedisServer, alive, fiscalised_count, make_certs, wide_budget
from integration.conftest import BRANDS
from kombu import Connection, Producer
from support import REDIS_PASSWORD, closed, dlq_entries, run_cli, wait_for, xadd

from worker import keys

A, C = "openapitest", "brand2"
RID = re.compile(r"^[0-9]+-[0-9]+$")  # a stream entry id: what a task carries


def secrets_of(fake) -> dict[str, str]:
    """Every secret text of the deployment: client secrets, the Redis password, the tokens
    the fake issued (and each token's signature alone, a partial leak)."""
    found = {f"client_secret {b}": secret for b, (_cid, secret) in BRANDS.items()}
    found["redis password"] = REDIS_PASSWORD
    for n, token in enumerate(fake.issued_tokens()):
        found[f"token #{n}"] = token
        found[f"token #{n} signature"] = token.rsplit(".", 1)[1]
    return found


def redis_texts(r: redis.Redis, pattern: str) -> str:
    parts = []
    for key in r.scan_iter(match=pattern, count=1000):
        kind = r.type(key)
        if kind == "string":
            parts.append(r.get(key) or "")
        elif kind == "hash":
            parts += [f"{k}={v}" for k, v in r.hgetall(key).items()]
        elif kind == "list":
            parts += r.lrange(key, 0, -1)
        parts.append(key)
    return "\n".join(parts)


class QueueWatcher:
    """Collects every task message seen on the Celery queue list and kombu's `unacked`
    hash, and every event on the event bus (what Flower shows), while the case runs."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.messages: dict[str, str] = {}
        self.events: list[str] = []
        self.stop = threading.Event()
        self.pubsub = r.pubsub()
        self.pubsub.psubscribe("*")
        self.threads = [
            threading.Thread(target=self._poll, daemon=True),
            threading.Thread(target=self._listen, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            try:
                raws = self.r.lrange(keys.CELERY_QUEUE, 0, -1)
                raws += [json.dumps(json.loads(v)[0]) for v in self.r.hvals("unacked")]
            except redis.RedisError:
                raws = []
            for raw in raws:
                message = json.loads(raw)
                self.messages[message["properties"]["delivery_tag"]] = raw
            self.stop.wait(0.05)

    def _listen(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.pubsub.get_message(timeout=0.2)
            except redis.RedisError:
                continue
            if item and item["type"] == "pmessage":
                self.events.append(readable(str(item["data"])))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.pubsub.close()


def readable(raw: str) -> str:
    """A kombu message as stored, with its (base64) body decoded beside it."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode("utf-8", "replace")
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw
    return f"{raw}\n{body}"


def task_arguments(raw: str) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    message = json.loads(raw)
    assert message["content-type"] == "application/json", message["content-type"]
    body = (
        base64.b64decode(message["body"])
        if message["properties"].get("body_encoding")
        else message["body"]
    )
    args, kwargs, _embed = json.loads(body)
    return args, kwargs, message["headers"]


def test_security_no_secret_or_token_leaves_its_place(r, fake, env, start_worker, ledger):
    for rid in range(1, 31):
        fake.add_receipt(A, closed(rid))
    fake.add_receipt(A, closed(31, fiscal_id="OTHER", lock=True))  # a conflict
    fake.add_receipt(C, closed(1))
    fake.reject_auth(C)  # an auth_failed dead letter, with the auth error in it
    fake.set_latency(0.3, method="GET")  # tasks wait in the queue while we read it
    watcher = QueueWatcher(r)
    worker = start_worker(
        "w1",
        concurrency=1,
        FISCAL_LOG_LEVEL="DEBUG",
        FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS="20",
        **wide_budget(fake),
    )
    try:
        for rid in range(1, 16):
            ledger.send(r, A, rid, f"F-{rid}")
        ledger.send(r, A, 31, "F-31", expect="fiscal_id_conflict")
        ledger.send(r, C, 1, "C-1", expect="auth_failed")
        ledger.send_raw(r, {"data": "not json"})
        wait_for(lambda: fiscalised_count(fake, A, range(1, 16)) >= 5, timeout=60)
        fake.revoke_tokens(A)  # a 401 and a second token, mid-run
        for rid in range(16, 31):
            ledger.send(r, A, rid, f"F-{rid}")
        settled = ledger.settle(timeout=120)
    finally:
        watcher.close()
    ledger.check(settled)
    secrets = secrets_of(fake)
    assert sum(1 for name in secrets if name.startswith("token #")) >= 4  # two tokens seen

    # Task messages carry ids only: [rid, dispatch] plus brand and receipt_id for Flower.
    assert watcher.messages, "no task message was seen on the queue"
    for raw in watcher.messages.values():
        args, kwargs, headers = task_arguments(raw)
        assert len(args) == 2 and RID.match(args[0]) and isinstance(args[1], int), args
        assert set(kwargs) == {"brand", "receipt_id"}, kwargs
        assert headers["task"] == "fiscal.fiscalise"
    ledger.figure("task_messages_read", len(watcher.messages))
    ledger.figure("events_read", len(watcher.events))
    dead = dlq_entries(r)
    first = next(e["id"] for e in dead)
    places = {
        "worker log": worker.log(),
        "task messages": "\n".join(readable(m) for m in watcher.messages.values()),
        "task events (Flower)": "\n".join(watcher.events),
        "dead-letter store": json.dumps(dead) + redis_texts(r, keys.DLQ_PATTERN),
        "audit trail": redis_texts(r, keys.receipt("*", "*")),
        "result records, schedule, counters": redis_texts(r, keys.result("*"))
        + json.dumps(r.zrange(keys.SCHEDULE, 0, -1))
        + json.dumps(r.hgetall(keys.COUNTERS)),
    }
    for command in (
        ("stats", "--json"),
        ("stats",),
        ("dlq", "list", "--json"),
        ("dlq", "show", first, "--json"),
        ("dlq", "stats", "--json"),
        ("receipt", A, "1", "--json"),
        ("receipt", A, "16", "--json"),
        ("receipt", C, "1", "--json"),
        ("metrics",),
    ):
        done = run_cli(env, *command)
        assert done.returncode == 0, (command, done.stderr)
        places["cli " + " ".join(command)] = done.stdout + done.stderr
    leaks = [
        f"{name} in the {where}"
        for where, text in places.items()
        for name, secret in secrets.items()
        if secret in text
    ]
    assert not leaks, leaks
    # Positive control: the secrets looked for are the live ones (the token cache has one).
    cached = r.get(keys.token(A)) or ""
    assert any(token in cached for token in fake.issued_tokens(A)), "token cache unseen"


class _Pwn:
    """Unpickling this creates the marker file: proof the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_security_a_pickled_task_message_is_refused_not_run(
    r, redis_server, fake, start_worker, tmp_path
):
    marker = tmp_path / "pickle-ran"
    fake.add_receipt(A, closed(1))
    worker = start_worker("w1")
    with Connection(redis_server.url) as connection:
        Producer(connection.default_channel).publish(
            ((_Pwn(marker),), {}, {}),  # protocol 2 body: (args, kwargs, embed)
            exchange="",
            routing_key=keys.CELERY_QUEUE,
            serializer="pickle",
            headers={
                "task": "fiscal.fiscalise",
                "id": "pickled-1",
                "lang": "py",
                "argsrepr": "(evil,)",
                "kwargsrepr": "{}",
                "retries": 0,
            },
        )
    wait_for(
        lambda: (
            r.llen(keys.CELERY_QUEUE) == 0 and "untrusted content of type pickle" in worker.log()
        ),
        timeout=30,
        what="the worker refusing the pickled message",
    )
    xadd(r, {"receipt_id": 1, "brand": A, "fiscal_id": "F-1"})  # and it still works
    wait_for(lambda: fiscalised_count(fake, A, [1]) == 1, timeout=30, what="a valid result")
    assert not marker.exists(), "the pickle was executed"
    assert alive(worker)


def test_security_redis_acl_user_from_the_settings(r, redis_server, fake, env, start_worker):
    password = "fw-acl-pw-5521"
    r.execute_command("ACL", "SETUSER", "fw", "on", f">{password}", "~*", "&*", "+@all")
    url = f"redis://fw:{password}@127.0.0.1:{redis_server.port}/0"
    fake.add_receipt(A, closed(1))
    worker = start_worker("w1", FISCAL_REDIS_URL=url)
    xadd(r, {"receipt_id": 1, "brand": A, "fiscal_id": "F-1"})
    wait_for(lambda: fiscalised_count(fake, A, [1]) == 1, timeout=30, what="landed via ACL user")
    users = {client.get("user") for client in r.client_list()}
    assert "fw" in users, users
    stats = run_cli({**env, "FISCAL_REDIS_URL": url}, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert password not in stats.stdout + stats.stderr + worker.log()
    wrong = run_cli({**env, "FISCAL_REDIS_URL": url.replace(password, "wrong-pw")}, "stats")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "wrong-pw" not in wrong.stderr


def test_security_rediss_to_a_tls_redis_server(fake, env, start_worker, tmp_path):
    certs = make_certs(tmp_path / "certs")
    directory = tmp_path / "redis-tls"
    directory.mkdir()
    server = TlsRedisServer(directory, "tls-redis-pw-8080", certs)
    try:
        server.start()
    except (AssertionError, OSError, subprocess.SubprocessError):
        log = (directory / "redis.log").read_text() if (directory / "redis.log").exists() else ""
        if "tls" in log.lower() and (
            "not supported" in log.lower() or "bad directive" in log.lower()
        ):
            pytest.skip("redis-server was built without TLS support")
        raise
    try:
        tls_env = {"FISCAL_REDIS_URL": server.url, "SSL_CERT_FILE": str(certs["ca"])}
        fake.add_receipt(A, closed(1))
        worker = start_worker("w1", **tls_env)
        client = server.client()
        xadd(client, {"receipt_id": 1, "brand": A, "fiscal_id": "F-1"})
        wait_for(lambda: fiscalised_count(fake, A, [1]) == 1, timeout=30, what="landed over TLS")
        stats = run_cli({**env, **tls_env}, "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["counters"].get("fiscalised") == 1
        # Certificates are verified: without our CA the same URL is refused, in one line.
        untrusted = run_cli({**env, "FISCAL_REDIS_URL": server.url}, "stats")
        assert untrusted.returncode == 1, untrusted.stdout
        assert len(untrusted.stderr.strip().splitlines()) == 1, untrusted.stderr
        assert "tls-redis-pw-8080" not in untrusted.stderr + worker.log()
        worker.stop()
    finally:
        server.stop()
