"""The adapter simulator (`fiscal-worker adapter-sim`, worker/demo/adapter.py): what it writes,
that it creates each closed receipt on the fake API first, that it waits out failures, that it
stops on SIGTERM (fakeredis, httpx.MockTransport, the fake Clopos app called in-process)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import fakeredis
import httpx
import pytest
import redis as redis_lib
from click.testing import CliRunner
from support import wait_for

from worker import redis_conn
from worker.cli import cli
from worker.decide import Action, decide
from worker.demo.adapter import AdapterSim, SimConfig, run_until_signalled
from worker.fake_clopos.app import build_app
from worker.fake_clopos.model import CloposModel, default_seed
from worker.ingest_format import parse_entry, parse_rfc3339
from worker.settings import get_settings

STREAM = "fiscal:results"


def entries(r: fakeredis.FakeRedis) -> list[Any]:
    return [parse_entry(fields["data"]) for _, fields in r.xrange(STREAM)]


def run_in_thread(sim: AdapterSim) -> threading.Thread:
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    return thread


def in_process(app: Any) -> httpx.MockTransport:
    """A sync transport that hands each request to an ASGI app in this process."""
    asgi = httpx.ASGITransport(app=app)

    def handler(request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=asgi, base_url="http://fake-clopos") as client:
                answer = await client.request(
                    request.method, request.url.path, content=request.content,
                    headers={"content-type": request.headers.get("content-type", "")},
                )  # fmt: skip
                return httpx.Response(answer.status_code, content=answer.content)

        return anyio.run(call)

    return httpx.MockTransport(handler)


@pytest.fixture
def fake() -> Iterator[tuple[CloposModel, httpx.Client]]:
    """The fake Clopos API (default seed: brand openapitest), its app in this process."""
    model = CloposModel()
    model.load_seed(default_seed())
    transport = in_process(build_app(model))
    with httpx.Client(transport=transport, base_url="http://fake-clopos") as client:
        yield model, client


# --- what it writes ----------------------------------------------------------------------


def test_each_result_is_a_valid_stream_entry_for_the_next_receipt(
    r: fakeredis.FakeRedis,
) -> None:
    sim = AdapterSim(r, SimConfig(brands=("acme", "bistro"), rate=50, count=4, start_id=100))
    sim.run()

    results = entries(r)
    assert [(x.brand, x.receipt_id) for x in results] == [
        ("acme", 100), ("bistro", 101), ("acme", 102), ("bistro", 103),
    ]  # fmt: skip
    assert len({x.result_id for x in results}) == 4
    assert len({x.fiscal_id for x in results}) == 4
    assert all(x.device_id == "adapter-sim" and parse_rfc3339(x.printed_at) for x in results)
    assert sim.sent == 4 and sim.error is None


def test_it_writes_to_the_configured_stream(r: fakeredis.FakeRedis) -> None:
    AdapterSim(r, SimConfig(rate=50, count=1, stream="other:stream")).run()
    assert r.xlen("other:stream") == 1 and r.xlen(STREAM) == 0


def test_default_receipt_ids_come_from_the_clock_so_a_restart_never_reuses_one(
    r: fakeredis.FakeRedis,
) -> None:
    first = AdapterSim(r, SimConfig(rate=50, count=3), clock=lambda: 1_700_000_000.0)
    first.run()
    # Restarted one second later: its ids start past everything the first could have sent
    # in that second at the highest rate.
    second = AdapterSim(r, SimConfig(rate=50, count=3), clock=lambda: 1_700_000_001.0)
    ids = [x.receipt_id for x in entries(r)]
    assert ids == [170_000_000_000, 170_000_000_001, 170_000_000_002]
    assert second.first_id == 170_000_000_100


def test_results_are_paced_at_the_rate(r: fakeredis.FakeRedis) -> None:
    started = time.monotonic()
    AdapterSim(r, SimConfig(rate=10, count=3)).run()
    # The third result goes out 2 intervals after the first: never earlier.
    assert time.monotonic() - started >= 0.2
    assert r.xlen(STREAM) == 3


# --- the fake Clopos API ----------------------------------------------------------------


def test_the_closed_receipt_exists_on_the_fake_before_its_result_is_sent(
    r: fakeredis.FakeRedis,
) -> None:
    seen: list[tuple[dict[str, Any], int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((json.loads(request.content), r.xlen(STREAM)))
        assert (request.method, request.url.path) == ("POST", "/_fake/receipts")
        return httpx.Response(200, json={"success": True, "data": {}})

    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake") as http:
        AdapterSim(r, SimConfig(rate=50, count=3, start_id=7), fake=http).run()

    # Each receipt was created while the stream held only the results before it.
    assert seen == [
        ({"brand": "openapitest", "receipt": {"id": 7}}, 0),
        ({"brand": "openapitest", "receipt": {"id": 8}}, 1),
        ({"brand": "openapitest", "receipt": {"id": 9}}, 2),
    ]
    assert r.xlen(STREAM) == 3


def test_the_fake_then_holds_a_receipt_the_worker_will_fiscalise(
    r: fakeredis.FakeRedis, fake: tuple[CloposModel, httpx.Client]
) -> None:
    model, client = fake
    AdapterSim(r, SimConfig(rate=50, count=2, start_id=9001), fake=client).run()

    for result in entries(r):
        receipt = model.receipt(result.brand, result.receipt_id)
        assert receipt is not None
        assert receipt["status"] == 2 and receipt["closed_at"] and receipt["fiscal_id"] is None
        decision = decide(receipt, result.fiscal_id)
        assert decision.action is Action.PATCH
        assert decision.fields == {"fiscal_id": result.fiscal_id, "lock": True}


def test_a_brand_the_fake_does_not_know_stops_the_run_with_one_line(
    r: fakeredis.FakeRedis, fake: tuple[CloposModel, httpx.Client]
) -> None:
    _, client = fake
    sim = AdapterSim(r, SimConfig(brands=("ghost",), rate=50, count=3), fake=client)
    sim.run()
    assert sim.error is not None and "ghost" in sim.error and "HTTP 400" in sim.error
    assert "\n" not in sim.error
    assert r.xlen(STREAM) == 0 and sim.sent == 0


# --- failures are waited out --------------------------------------------------------------


class FlakyRedis:
    """fakeredis whose first `failures` XADDs fail as if Redis were unreachable."""

    def __init__(self, inner: fakeredis.FakeRedis, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def xadd(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise redis_lib.exceptions.ConnectionError("Connection refused")
        return self.inner.xadd(*args, **kwargs)


def test_redis_unreachable_is_waited_out_and_the_same_result_sent_again(
    r: fakeredis.FakeRedis,
) -> None:
    flaky: Any = FlakyRedis(r, failures=2)
    sim = AdapterSim(flaky, SimConfig(rate=50, count=2, start_id=40), retry_seconds=0.01)
    sim.run()
    assert flaky.failures == 0
    assert [x.receipt_id for x in entries(r)] == [40, 41]  # none skipped, none twice
    assert sim.sent == 2 and sim.error is None


@pytest.mark.parametrize("failure", ["connect-error", "http-503"])
def test_the_fake_unreachable_or_failing_is_waited_out(
    r: fakeredis.FakeRedis, failure: str
) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["receipt"]["id"])
        if len(calls) == 1:
            if failure == "connect-error":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(503, json={"success": False, "error": "unavailable"})
        return httpx.Response(200, json={"success": True, "data": {}})

    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fake") as http:
        sim = AdapterSim(r, SimConfig(rate=50, count=2, start_id=5), fake=http, retry_seconds=0.01)
        sim.run()
    assert calls == [5, 5, 6]
    assert [x.receipt_id for x in entries(r)] == [5, 6]
    assert sim.error is None


# --- stopping ------------------------------------------------------------------------------


def test_stop_ends_even_the_longest_pause_at_once(r: fakeredis.FakeRedis) -> None:
    sim = AdapterSim(r, SimConfig(rate=0.1))  # 10 s between two results
    thread = run_in_thread(sim)
    wait_for(lambda: r.xlen(STREAM) == 1, timeout=10, what="the first result")
    started = time.monotonic()
    sim.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2
    assert r.xlen(STREAM) == 1


def test_sigterm_stops_it_cleanly_and_restores_the_handler(r: fakeredis.FakeRedis) -> None:
    sim = AdapterSim(r, SimConfig(rate=20))  # no count: runs until a signal
    before = signal.getsignal(signal.SIGTERM)
    sent_at: list[float] = []

    def terminate_after_two() -> None:
        try:
            wait_for(lambda: r.xlen(STREAM) >= 2, timeout=10, what="two results")
        finally:  # whatever happens, the run must end
            sent_at.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_two, daemon=True)
    killer.start()
    run_until_signalled(sim)
    returned = time.monotonic()
    killer.join(5)

    assert sim.sent >= 2 and sim.error is None
    assert r.xlen(STREAM) == sim.sent  # no result half-sent
    assert returned - sent_at[0] < 3
    assert signal.getsignal(signal.SIGTERM) is before


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def cli_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: client)
    for name in [n for n in os.environ if n.startswith("FISCAL_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield client
    get_settings.cache_clear()


def test_the_command_sends_count_results_and_exits_0(cli_redis: fakeredis.FakeRedis) -> None:
    result = CliRunner().invoke(
        cli, ["adapter-sim", "--brand", "acme", "--count", "2", "--rate", "50", "--start-id", "3"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "sent 2 results"
    assert [(x.brand, x.receipt_id) for x in entries(cli_redis)] == [("acme", 3), ("acme", 4)]


def test_the_command_refuses_a_bad_brand_as_a_usage_error(cli_redis: fakeredis.FakeRedis) -> None:
    result = CliRunner().invoke(cli, ["adapter-sim", "--brand", "no spaces", "--count", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --brand 'no spaces'")
    assert cli_redis.xlen(STREAM) == 0


def test_the_command_reports_a_refusing_fake_as_exit_1(
    cli_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(base_url: str) -> httpx.Client:
        def handler(request: httpx.Request) -> httpx.Response:
            body = {"success": False, "error": "bad_request", "message": "unknown brand 'acme'"}
            return httpx.Response(400, json=body)

        return httpx.Client(transport=httpx.MockTransport(handler), base_url=base_url)

    monkeypatch.setattr("worker.demo.adapter.fake_client", refusing)
    args = ["--brand", "acme", "--count", "1", "--start-id", "77", "--fake-clopos", "http://f"]
    result = CliRunner().invoke(cli, ["adapter-sim", *args])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: the fake Clopos API refused receipt 77 of brand 'acme': "
        "HTTP 400 (unknown brand 'acme')"
    )
    assert cli_redis.xlen(STREAM) == 0
