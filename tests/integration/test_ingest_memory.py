"""Ingest against a real redis-server out of memory (maxmemory, `noeviction`): while Redis
refuses writes nothing is acknowledged or dead-lettered, however often the entries are
delivered; once memory is freed every entry is settled exactly once. Also on a real server:
the read bound and pruning dead consumers (the scripts run there, not just on fakeredis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from support import RedisServer, dlq_entries, wait_for

from worker import keys
from worker.audit import AuditTrail
from worker.dlq import DeadLetterStore
from worker.ingest import MAX_DELIVERIES, IngestConsumer
from worker.ratelimit import RatePolicy
from worker.store import ResultStore

STREAM = "fiscal:results"
MIB = 1024 * 1024
POLICY = RatePolicy(limit=100_000, window=60, margin=0, lead=60)  # every result has a slot now


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    return redis_server  # the integration conftest's private redis-server


@pytest.fixture
def text(server: RedisServer) -> redis.Redis:
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    return client


def make_consumer(
    server: RedisServer, text: redis.Redis, published: list[Any], name: str = "c1", **kw: Any
) -> IngestConsumer:
    consumer = IngestConsumer(
        redis_client=server.client(decode=False),
        stream=STREAM,
        consumer=name,
        store=ResultStore(text, rate=POLICY),
        dlq=DeadLetterStore(text),
        audit=AuditTrail(text, ttl_seconds=3600, max_attempts=10),
        publish=lambda *args: published.append(args),
        queue_has_room=lambda: True,
        claim_idle_seconds=0,  # reclaim() takes over what is pending at once
        block_ms=10,
        **kw,
    )
    consumer.ensure_group()
    return consumer


def pending(text: redis.Redis) -> dict[str, int]:
    rows = text.xpending_range(STREAM, keys.INGEST_GROUP, min="-", max="+", count=1000)
    return {row["message_id"]: row["times_delivered"] for row in rows}


def fill_memory(text: redis.Redis) -> list[str]:
    """Fill Redis up: 8 MiB of big keys, then maxmemory 2 MiB below what is used. From then
    on every write that may grow memory is refused, until the big keys are deleted."""
    filler = [f"filler:{i}" for i in range(16)]
    for key in filler:
        text.set(key, b"\0" * (512 * 1024))
    used = int(text.info("memory")["used_memory"])
    text.config_set("maxmemory", used - 2 * MIB)
    return filler


def test_nothing_is_acknowledged_while_redis_is_out_of_memory_and_all_land_after(
    server: RedisServer, text: redis.Redis
) -> None:
    published: list[Any] = []
    consumer = make_consumer(server, text, published)
    valid = [
        str(
            text.xadd(
                STREAM, {"data": json.dumps({"receipt_id": n, "brand": "b", "fiscal_id": "F"})}
            )
        )
        for n in range(1, 21)
    ]
    invalid = str(text.xadd(STREAM, {"data": "not json"}))
    entries = {*valid, invalid}

    filler = fill_memory(text)
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        text.hset("probe", "a", "b")  # writes are refused now
    assert consumer.poll() == 21
    for _ in range(MAX_DELIVERIES + 2):
        assert consumer.reclaim() == 21
    assert set(pending(text)) == entries, "nothing acknowledged"
    assert min(pending(text).values()) > MAX_DELIVERIES
    assert text.xlen(STREAM) == 21
    assert dlq_entries(text) == []
    assert text.zcard(keys.SCHEDULE) == 0 and published == []

    text.delete(*filler)  # memory freed
    memory = text.info("memory")
    assert int(memory["used_memory"]) < int(memory["maxmemory"])
    for _ in range(5):
        consumer.reclaim()
        consumer.poll()
        if text.xlen(STREAM) == 0:
            break
    assert text.xlen(STREAM) == 0 and pending(text) == {}
    assert set(text.zrange(keys.SCHEDULE, 0, -1)) == set(valid), "every valid entry recorded"
    assert sorted(args[0] for args in published) == sorted(valid), "each published once"
    letters = dlq_entries(text)
    assert [entry["result_id"] for entry in letters] == [invalid]
    assert letters[0]["payload"] == "not json"
    assert "could not be settled" not in letters[0]["error"]
    assert int(text.hget(keys.COUNTERS, "received")) == 20


def test_reads_are_bounded_on_a_real_server(server: RedisServer, text: redis.Redis) -> None:
    published: list[Any] = []
    consumer = make_consumer(server, text, published)
    sizes: list[int] = []
    execute = consumer.redis.execute_command

    def spy(*args: Any, **options: Any) -> Any:
        reply = execute(*args, **options)
        sizes.append(len(repr(reply)) // 4)  # bytes repr as \x00 escapes: 4 chars a byte
        return reply

    consumer.redis.execute_command = spy  # type: ignore[method-assign]
    ids = {str(text.xadd(STREAM, {"data": b"\0" * MIB})) for _ in range(30)}
    read = 0
    while read < 30:
        got = consumer.poll()
        assert got
        read += got
    assert max(sizes) <= consumer.read_bytes + 64 * 1024
    assert text.xlen(STREAM) == 0
    assert {entry["result_id"] for entry in dlq_entries(text)} == ids


def test_prune_consumers_on_a_real_server(server: RedisServer, text: redis.Redis) -> None:
    consumer = make_consumer(server, text, [], name="me:1")
    for name in ("me:1", "dead:2", "holder:3"):
        text.xgroup_createconsumer(STREAM, keys.INGEST_GROUP, name)
    text.xadd(STREAM, {"data": "{}"})
    text.xreadgroup(keys.INGEST_GROUP, "holder:3", {STREAM: ">"}, count=1)
    assert wait_for(lambda: consumer.prune_consumers(idle_seconds=0.05), timeout=5) == 1
    names = {row["name"] for row in text.xinfo_consumers(STREAM, keys.INGEST_GROUP)}
    assert names == {"me:1", "holder:3"}
    assert len(pending(text)) == 1
