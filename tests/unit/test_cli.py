"""`fiscal-worker`: output, JSON shape, exit codes, confirmation (CliRunner + fakeredis),
and the real entry point in a subprocess for the failure paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import click
import fakeredis
import pytest
import redis as redis_lib
from click.testing import CliRunner, Result

from worker import redis_conn
from worker.audit import AuditTrail
from worker.cli import cli
from worker.cli import dlq as dlq_commands
from worker.dlq import MAX_PAYLOAD_BYTES, REASONS, DeadLetterStore
from worker.oplog import OperatorLog
from worker.settings import get_settings
from worker.testing import clean_env

CONTRACT_FIELDS = {
    "id", "reason", "receipt_id", "brand", "fiscal_id", "attempts", "first_seen",
    "last_seen", "error", "http_status", "payload", "payload_truncated", "payload_bytes",
    "payload_sha256",
}  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process without the FISCAL_* settings of the shell it runs in."""
    for name in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(name)


@pytest.fixture
def redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[fakeredis.FakeRedis]:
    """A fakeredis behind `worker.redis_conn.redis_client`, default settings."""
    client = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: client)
    _clean_env(monkeypatch)
    get_settings.cache_clear()
    yield client
    get_settings.cache_clear()


@pytest.fixture
def store(redis: fakeredis.FakeRedis) -> DeadLetterStore:
    return DeadLetterStore(redis)


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, prog_name="fiscal-worker")


def add(
    store: DeadLetterStore,
    *,
    reason: str = "unknown_brand",
    brand: str = "acme",
    receipt_id: int = 7,
    payload: str | None = None,
    error: str = "no credentials",
) -> str:
    if payload is None:
        payload = json.dumps({"receipt_id": receipt_id, "brand": brand, "fiscal_id": "F-7"})
    return store.add(
        reason=reason,
        payload=payload,
        error=error,
        brand=brand,
        receipt_id=receipt_id,
        fiscal_id="F-7",
        attempts=2,
        http_status=404,
    )


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- dlq list / show / stats -----------------------------------------------------------


def test_list_empty(redis: fakeredis.FakeRedis) -> None:
    result = run("dlq", "list")
    assert result.exit_code == 0
    assert "no dead-lettered results" in result.stdout
    result = run("dlq", "list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_list_json_is_an_array_of_contract_entries(store: DeadLetterStore) -> None:
    add(store, reason="auth_failed")
    add(store, reason="receipt_not_found")
    result = run("dlq", "list", "--json")
    assert result.exit_code == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [e["id"] for e in entries] == ["dl-2", "dl-1"]
    for entry in entries:
        assert set(entry) >= CONTRACT_FIELDS
        assert entry["reason"] in REASONS
    assert entries[0]["payload"] == '{"receipt_id": 7, "brand": "acme", "fiscal_id": "F-7"}'


def test_list_shows_the_newest_100_unless_told(store: DeadLetterStore) -> None:
    for _ in range(105):
        add(store)
    assert len(json.loads(run("dlq", "list", "--json").stdout)) == 100
    limited = json.loads(run("dlq", "list", "--json", "--limit", "3").stdout)
    assert [e["id"] for e in limited] == ["dl-105", "dl-104", "dl-103"]
    assert len(json.loads(run("dlq", "list", "--json", "--limit", "200").stdout)) == 105


def test_list_filters(store: DeadLetterStore) -> None:
    add(store, reason="auth_failed", brand="a")
    add(store, reason="auth_failed", brand="b")
    add(store, reason="receipt_not_found", brand="a")
    ids = lambda *args: [e["id"] for e in json.loads(run("dlq", "list", "--json", *args).stdout)]  # noqa: E731
    assert ids("--reason", "auth_failed") == ["dl-2", "dl-1"]
    assert ids("--brand", "a") == ["dl-3", "dl-1"]
    assert ids("--reason", "auth_failed", "--brand", "a") == ["dl-1"]


def test_list_table(store: DeadLetterStore) -> None:
    add(store, error="brand acme has no credentials " + "x" * 200)
    result = run("dlq", "list")
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()[:2]
    for column in ("id", "reason", "brand", "receipt_id", "fiscal_id", "attempts", "last_seen"):
        assert column in header
    assert "dl-1" in row and "unknown_brand" in row and "acme" in row and "404" in row
    assert "x" * 100 not in row  # long errors are shortened


def test_hostile_strings_are_escaped_for_the_terminal(store: DeadLetterStore) -> None:
    store.add(
        reason="invalid_message",
        payload='{"brand": "\\u001b[2J[bold]x[/bold]"}',
        error="brand: must be 1-64 characters \x1b[31mred\x1b[0m [bold]markup[/bold]",
        brand="\x1b]0;pwned\x07",
    )
    for args in (("dlq", "list"), ("dlq", "show", "dl-1"), ("dlq", "list", "--json")):
        result = run(*args)
        assert result.exit_code == 0
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "[bold]mar" in run("dlq", "list").stdout  # rich markup shown, not interpreted
    assert "[bold]markup[/bold]" in run("dlq", "show", "dl-1").stdout


@pytest.mark.parametrize("args", [("--reason", "bogus"), ("--limit", "0"), ("--brand", "a:b")])
def test_list_usage_errors_exit_2(redis: fakeredis.FakeRedis, args: tuple[str, ...]) -> None:
    assert run("dlq", "list", *args).exit_code == 2


def test_show(store: DeadLetterStore) -> None:
    add(store)
    result = run("dlq", "show", "dl-1", "--json")
    assert result.exit_code == 0
    entry = json.loads(result.stdout)
    assert entry["id"] == "dl-1" and set(entry) >= CONTRACT_FIELDS
    text = run("dlq", "show", "dl-1").stdout
    assert "unknown_brand" in text and '"fiscal_id": "F-7"' in text  # payload included


@pytest.mark.parametrize("entry_id", ["dl-9", "nonsense"])
def test_show_unknown_id_fails_with_one_line(store: DeadLetterStore, entry_id: str) -> None:
    result = run("dlq", "show", entry_id)
    assert result.exit_code == 1
    assert one_line(result.stderr) == f"error: no dead-letter entry {entry_id}"


def test_stats(store: DeadLetterStore) -> None:
    add(store, reason="auth_failed", brand="a")
    add(store, reason="auth_failed", brand="b")
    store.add(reason="invalid_message", payload="nope", error="not JSON")
    result = run("dlq", "stats", "--json")
    assert result.exit_code == 0
    stats = json.loads(result.stdout)
    assert stats == {
        "total": 3,
        "bytes": store.stats()["bytes"],
        "by_reason": {"invalid_message": 1, "auth_failed": 2},
        "by_brand": {"": 1, "a": 1, "b": 1},
        "warn_entries": 100_000,
        "warn_bytes": 1024**3,
        "over_bound": False,
    }
    assert stats["bytes"] > 0
    text = run("dlq", "stats").stdout
    assert "total:   3" in text and "auth_failed" in text and "(unknown)" in text
    assert f"bytes:   {stats['bytes']} = " in text
    assert "trimmed" not in text and "WARNING" not in text


def test_stats_warns_over_the_bound(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISCAL_DLQ_WARN_ENTRIES", "2")
    get_settings.cache_clear()
    for _ in range(3):
        add(store)
    stats = json.loads(run("dlq", "stats", "--json").stdout)
    assert (stats["total"], stats["warn_entries"], stats["over_bound"]) == (3, 2, True)
    result = run("dlq", "stats")
    assert result.exit_code == 0
    assert "total:   3 (warns at 2)" in result.stdout
    [warning] = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert "over its bound" in warning and "nothing is dropped" in warning
    assert len(json.loads(run("dlq", "list", "--json").stdout)) == 3  # all kept


# --- dlq replay ------------------------------------------------------------------------


def test_replay_one(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    add(store)
    result = run("dlq", "replay", "dl-1")
    assert result.exit_code == 0, result.stderr
    assert "1 replayed, 0 refused" in result.stdout
    [(_, fields)] = redis.xrange("fiscal:results")
    assert fields == {
        "data": '{"receipt_id": 7, "brand": "acme", "fiscal_id": "F-7"}',
        "replay_of": "dl-1",
    }
    assert store.count() == 0


def test_replay_unknown_id_fails(store: DeadLetterStore) -> None:
    result = run("dlq", "replay", "dl-4")
    assert result.exit_code == 1
    assert one_line(result.stderr) == "error: no dead-letter entry dl-4"


def test_replay_truncated_entry_is_refused(store: DeadLetterStore) -> None:
    store.add(reason="invalid_message", payload="x" * (MAX_PAYLOAD_BYTES + 1), error="big")
    result = run("dlq", "replay", "dl-1")
    assert result.exit_code == 1
    assert "dl-1: payload was truncated (1048577 bytes); cannot replay" in result.stdout
    assert store.count() == 1


def test_bulk_replay_reports_replayed_and_refused(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    add(store, reason="auth_failed", brand="a")
    add(store, reason="auth_failed", brand="b")
    store.add(reason="auth_failed", payload="x" * (MAX_PAYLOAD_BYTES + 1), error="big")
    add(store, reason="receipt_not_found", brand="a")
    result = run("dlq", "replay", "--reason", "auth_failed", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["id"] for r in report["replayed"]] == ["dl-1", "dl-2"]
    assert [r["id"] for r in report["refused"]] == ["dl-3"]
    assert "truncated" in report["refused"][0]["error"]
    assert redis.xlen("fiscal:results") == 2
    assert [e["id"] for e in store.list()] == ["dl-4", "dl-3"]
    result = run("dlq", "replay", "--all")
    assert result.exit_code == 0
    assert "1 replayed, 1 refused" in result.stdout


def test_replay_by_brand(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    add(store, brand="a")
    add(store, brand="b")
    assert run("dlq", "replay", "--brand", "b").exit_code == 0
    assert [e["id"] for e in store.list()] == ["dl-1"]


def test_replay_uses_the_configured_stream(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISCAL_INGEST_STREAM", "other:stream")
    get_settings.cache_clear()
    add(store)
    assert run("dlq", "replay", "dl-1").exit_code == 0
    assert redis.xlen("other:stream") == 1


@pytest.mark.parametrize(
    "args",
    [(), ("dl-1", "--all"), ("dl-1", "--reason", "auth_failed"), ("--all", "--brand", "a")],
)
@pytest.mark.parametrize("command", ["replay", "purge"])
def test_selection_must_be_exactly_one(
    store: DeadLetterStore, command: str, args: tuple[str, ...]
) -> None:
    add(store)
    result = (
        run("dlq", command, *args, "--yes") if command == "purge" else run("dlq", command, *args)
    )
    assert result.exit_code == 2
    assert store.count() == 1


# --- dlq purge -------------------------------------------------------------------------


def test_purge_one_needs_no_confirmation(store: DeadLetterStore) -> None:
    add(store)
    add(store)
    result = run("dlq", "purge", "dl-1")
    assert result.exit_code == 0
    assert "purged 1 entry" in result.stdout
    assert [e["id"] for e in store.list()] == ["dl-2"]
    assert run("dlq", "purge", "dl-1").exit_code == 1


def test_bulk_purge_without_a_terminal_needs_yes(store: DeadLetterStore) -> None:
    add(store)
    result = run("dlq", "purge", "--all")
    assert result.exit_code == 1
    assert "--yes" in one_line(result.stderr)
    assert store.count() == 1
    result = run("dlq", "purge", "--all", "--yes", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"purged": 1}
    assert store.count() == 0


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 1), ("n\n", 1, 3), ("\n", 1, 3)])
def test_bulk_purge_asks(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch, answer: str, code: int, left: int
) -> None:
    monkeypatch.setattr(dlq_commands, "_stdin_is_interactive", lambda: True)
    add(store, reason="auth_failed")
    add(store, reason="auth_failed")
    add(store, reason="receipt_not_found")
    result = run("dlq", "purge", "--reason", "auth_failed", input=answer)
    assert "Purge 2 entries? [y/N]" in result.output
    assert result.exit_code == code
    assert store.count() == left


def test_bulk_purge_of_nothing(store: DeadLetterStore) -> None:
    result = run("dlq", "purge", "--brand", "nobody")
    assert result.exit_code == 0
    assert "purged 0 entries" in result.stdout


def fail_after(monkeypatch: pytest.MonkeyPatch, name: str, calls: int) -> None:
    """DeadLetterStore.`name` works `calls` times, then Redis goes away."""
    real = getattr(DeadLetterStore, name)
    done: list[object] = []

    def flaky(self: DeadLetterStore, *args: object, **kwargs: object) -> object:
        if len(done) >= calls:
            raise redis_lib.exceptions.ConnectionError("Connection refused")
        done.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeadLetterStore, name, flaky)


def test_a_bulk_replay_cut_short_by_redis_says_what_it_did(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [add(store, receipt_id=n) for n in (1, 2, 3)]
    fail_after(monkeypatch, "replay", 1)
    result = run("dlq", "replay", "--all")
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith("error: ")
    assert "1 replayed and 0 refused before it failed" in line
    assert "Run the same command again for the rest." in line
    [logged] = OperatorLog(redis).recent()
    assert (logged["action"], logged["count"], logged["ids"]) == ("replay", 1, [ids[0]])
    assert store.count() == 2


def test_a_bulk_replay_cut_short_by_redis_with_json_says_what_it_did(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [add(store, receipt_id=n) for n in (1, 2)]
    fail_after(monkeypatch, "replay", 1)
    result = run("dlq", "replay", "--all", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [item["id"] for item in document["replayed"]] == [ids[0]]
    assert document["refused"] == []
    assert "1 replayed and 0 refused before it failed" in document["error"]
    assert one_line(result.stderr).startswith("error: ")


def test_a_bulk_purge_cut_short_by_redis_says_what_it_did(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in (1, 2, 3):
        add(store, receipt_id=n)
    fail_after(monkeypatch, "_remove_many", 0)
    result = run("dlq", "purge", "--all", "--yes")
    assert result.exit_code == 1
    assert "0 purged before it failed" in one_line(result.stderr)
    [logged] = OperatorLog(redis).recent()
    assert (logged["action"], logged["count"]) == ("purge", 0)
    assert store.count() == 3


# --- receipt ---------------------------------------------------------------------------


def test_receipt(redis: fakeredis.FakeRedis) -> None:
    trail = AuditTrail(redis, ttl_seconds=600, max_attempts=10)
    trail.record_received("acme", 7, fiscal_id="F-7", device_id="printer-7")
    trail.record_attempt("acme", 7, call="GET", http_status=404, outcome="not found")
    trail.record_attempt("acme", 7, call="PATCH", http_status=200, outcome="fiscalised")
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    result = run("receipt", "acme", "7", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["state"] == "fiscalised" and record["fiscal_id"] == "F-7"
    assert [(a["call"], a["http_status"], a["outcome"]) for a in record["attempts"]] == [
        ("GET", 404, "not found"),
        ("PATCH", 200, "fiscalised"),
    ]
    assert all(a["at"].endswith("Z") for a in record["attempts"])
    text = run("receipt", "acme", "7").stdout
    assert "fiscalised" in text and "F-7" in text and "PATCH" in text and "404" in text


def test_unknown_receipt(redis: fakeredis.FakeRedis) -> None:
    result = run("receipt", "acme", "8")
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith("error: no record for brand acme receipt 8: never received, or older")
    assert "the audit window (7 days after its last write, FISCAL_AUDIT_TTL_SECONDS)" in line


@pytest.mark.parametrize("args", [("a:b", "1"), ("", "1"), ("acme", "0"), ("acme", "x"), ("acme",)])
def test_receipt_usage_errors(redis: fakeredis.FakeRedis, args: tuple[str, ...]) -> None:
    assert run("receipt", *args).exit_code == 2


# --- submit ----------------------------------------------------------------------------


def test_submit(redis: fakeredis.FakeRedis) -> None:
    result = run(
        "submit",
        "--brand",
        "acme",
        "--receipt-id",
        "7",
        "--fiscal-id",
        "F-7",
        "--venue-id",
        "2",
        "--device-id",
        "p7",
        "--result-id",
        "r1",
        "--printed-at",
        "2024-05-01T12:30:00Z",
    )
    assert result.exit_code == 0, result.stderr
    [(entry_id, fields)] = redis.xrange("fiscal:results")
    assert result.stdout.strip() == entry_id
    assert json.loads(fields["data"]) == {
        "receipt_id": 7,
        "brand": "acme",
        "fiscal_id": "F-7",
        "venue_id": 2,
        "device_id": "p7",
        "printed_at": "2024-05-01T12:30:00Z",
        "result_id": "r1",
    }
    result = run("submit", "--brand", "a", "--receipt-id", "1", "--fiscal-id", "f", "--json")
    assert json.loads(result.stdout) == {
        "stream": "fiscal:results",
        "id": redis.xrange("fiscal:results")[-1][0],
    }


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--receipt-id", "0"), "receipt_id"),
        (("--fiscal-id", " F"), "fiscal_id"),
        (("--brand", "a:b"), "brand"),
        (("--printed-at", "noon"), "printed_at"),
        (("--venue-id", "0"), "venue_id"),
    ],
)
def test_submit_invalid_input_exits_2_with_one_line(
    redis: fakeredis.FakeRedis, args: tuple[str, ...], field: str
) -> None:
    base = {"--brand": "acme", "--receipt-id": "7", "--fiscal-id": "F-7"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = run("submit", *[part for pair in base.items() for part in pair])
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"error: {field}: ")
    assert redis.exists("fiscal:results") == 0


def test_submit_missing_option_is_a_usage_error(redis: fakeredis.FakeRedis) -> None:
    assert run("submit", "--brand", "acme").exit_code == 2


# --- commands implemented elsewhere ----------------------------------------------------


def test_fake_clopos_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    module = types.ModuleType("worker.fake_clopos")
    module.serve = lambda *args, **kwargs: calls.append((args, kwargs))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.fake_clopos", module)
    seed = tmp_path / "seed.json"
    seed.write_text("{}")
    result = run(
        "fake-clopos",
        "--port",
        "9000",
        "--seed",
        str(seed),
        "--rate-limit",
        "5",
        "--token-lifetime",
        "30",
    )
    assert result.exit_code == 0, result.output
    assert calls == [(("127.0.0.1", 9000, str(seed)), {"token_lifetime": 30.0, "rate_limit": 5})]


@pytest.mark.parametrize("code", [0, 3])
def test_demo_exit_status_is_run_demos(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    module = types.ModuleType("worker.demo")
    module.run_demo = lambda **_: code  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.demo", module)
    assert run("demo").exit_code == code


DEMO_EXTRA = "needs the [demo] extra (fakeredis): pip install 'fiscal-worker[demo]'"


@pytest.mark.parametrize(
    ("missing", "extra"), [("fakeredis", True), ("fakeredis.aio", True), ("nope", False)]
)
def test_a_module_missing_while_the_demo_runs(
    monkeypatch: pytest.MonkeyPatch, missing: str, extra: bool
) -> None:
    def run_demo(**_: object) -> int:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    module = types.ModuleType("worker.demo")
    module.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.demo", module)
    result = run("demo")
    assert result.exit_code == 1
    if extra:
        assert one_line(result.stderr) == f"error: the demo {DEMO_EXTRA}"
    else:  # not the extra's: a bug, raised as it is
        assert isinstance(result.exception, ModuleNotFoundError)
        assert result.exception.name == missing


# --- failures --------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_errors_become_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("FISCAL_REDIS_URL", f"redis://:s3cretpw@127.0.0.1:{_closed_port()}/0")
    get_settings.cache_clear()
    redis_conn.reset_clients()
    try:
        for args in (("dlq", "list"), ("dlq", "stats", "--json"), ("receipt", "a", "1")):
            result = run(*args)
            assert result.exit_code == 1
            line = one_line(result.stderr)
            assert line.startswith("error: Redis unreachable at redis://:***@127.0.0.1:")
            assert "s3cretpw" not in result.output
    finally:
        get_settings.cache_clear()
        redis_conn.reset_clients()


def test_other_redis_errors_are_one_line(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise redis_lib.exceptions.ResponseError("OOM command not allowed")

    monkeypatch.setattr(redis, "zrevrange", broken)
    result = run("dlq", "list")
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        "error: Redis error at redis://localhost:6379/0 (ResponseError: OOM command not allowed)"
    )


def test_bad_setting_is_one_line(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISCAL_DLQ_WARN_ENTRIES", "lots")
    get_settings.cache_clear()
    result = run("dlq", "list")
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: FISCAL_DLQ_WARN_ENTRIES: ")


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_everywhere() -> None:
    commands = list(_all_commands(cli))
    assert ("dlq", "purge") in commands and ("fake-clopos",) in commands
    for command in commands:
        result = run(*command, "--help")
        assert result.exit_code == 0, command
        assert "Usage: fiscal-worker" in result.stdout


# --- the real entry point --------------------------------------------------------------


def _run_process(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_process_redis_unreachable() -> None:
    url = f"redis://:s3cretpw@127.0.0.1:{_closed_port()}/0"
    proc = _run_process("dlq", "list", FISCAL_REDIS_URL=url)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("error: Redis unreachable at redis://:***@127.0.0.1:")
    assert "Traceback" not in proc.stderr
    assert "s3cretpw" not in proc.stderr + proc.stdout


def test_process_malformed_setting() -> None:
    proc = _run_process("dlq", "stats", FISCAL_RATE_LIMIT_REQUESTS="abc")
    assert proc.returncode == 1
    assert one_line(proc.stderr).startswith("error: FISCAL_RATE_LIMIT_REQUESTS: ")
    assert "Traceback" not in proc.stderr


def test_process_malformed_redis_url_does_not_leak_it() -> None:
    proc = _run_process("dlq", "stats", FISCAL_REDIS_URL="redis://:s3cretpw@host:port/0")
    assert proc.returncode == 1
    assert one_line(proc.stderr) == "error: FISCAL_REDIS_URL: not a valid Redis URL"


def test_process_help_and_usage_error() -> None:
    proc = _run_process("--help")
    assert proc.returncode == 0
    assert "dlq" in proc.stdout and "receipt" in proc.stdout and "submit" in proc.stdout
    proc = _run_process("dlq", "list", "--reason", "bogus")
    assert proc.returncode == 2
    proc = _run_process("no-such-command")
    assert proc.returncode == 2
