"""The token provider across processes: real redis-server, the fake API over HTTP."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import redis
from support import closed, wait_for

from worker import keys
from worker.clopos.auth import AuthCaller
from worker.clopos.client import CloposClient
from worker.clopos.tokens import TokenProvider
from worker.clopos.wire import Wire
from worker.settings import BrandCredentials

BRANDS = {"openapitest": ("client-openapitest", "secret-openapitest-0001"),
          "brand2": ("client-brand2", "secret-brand2-0002")}  # fmt: skip


def make_client(redis_url: str, base_url: str) -> CloposClient:
    wire = Wire(base_url)
    auth = AuthCaller(
        wire,
        integrator_id="fake-integrator",
        credentials={
            b: BrandCredentials(client_id=c, client_secret=s) for b, (c, s) in BRANDS.items()
        },
    )
    tokens = TokenProvider(
        redis.Redis.from_url(redis_url, decode_responses=True), auth.authenticate
    )
    return CloposClient(wire, tokens)


def ask_for_tokens(redis_url: str, base_url: str, barrier, out) -> None:
    client = make_client(redis_url, base_url)
    barrier.wait(10)  # all processes ask at the same moment
    out.put(tuple(client.tokens.get(b) for b in sorted(BRANDS)))


def run_processes(redis_url: str, base_url: str, n: int = 8) -> list[tuple[str, ...]]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=ask_for_tokens, args=(redis_url, base_url, barrier, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


def test_eight_processes_at_once_make_one_auth_call_per_brand(redis_server, fake):
    results = run_processes(redis_server.url, fake.base_url)
    assert len(set(results)) == 1  # every process got the same token per brand
    assert fake.stats()["auth_calls"] == {"brand2": 1, "openapitest": 1}


def test_expiry_causes_one_refresh(redis_server, fake):
    fake.token_lifetime = 2.0
    first = run_processes(redis_server.url, fake.base_url, n=4)
    r = redis_server.client()
    wait_for(lambda: not r.exists(keys.token("openapitest"), keys.token("brand2")), timeout=10)
    second = run_processes(redis_server.url, fake.base_url, n=8)
    assert len(set(second)) == 1 and second[0] != first[0]
    assert fake.stats()["auth_calls"] == {"brand2": 2, "openapitest": 2}


def test_401_reauthenticates_once_and_the_retried_call_succeeds(redis_server, fake):
    fake.add_receipt("openapitest", closed(1))
    client = make_client(redis_server.url, fake.base_url)
    client.get_receipt("openapitest", 1)
    fake.revoke_tokens("openapitest")
    response = client.get_receipt("openapitest", 1)
    assert response.data["data"]["id"] == 1
    assert fake.stats()["auth_calls"]["openapitest"] == 2


@pytest.mark.parametrize("lifetime", [3600.0])
def test_token_ttl_in_redis_is_no_longer_than_its_life(redis_server, fake, lifetime):
    fake.token_lifetime = lifetime
    client = make_client(redis_server.url, fake.base_url)
    client.tokens.get("openapitest")
    ttl = redis_server.client().pttl(keys.token("openapitest"))
    assert 0 < ttl <= lifetime * 1000
