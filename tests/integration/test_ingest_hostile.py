"""Hostile input: whatever an adapter writes to the stream, the ingest consumer never crashes,
never drops it, and dead-letters every entry it cannot accept with its payload intact."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import RedisServer, closed, dlq_entries, patches, wait_finished

from worker import keys
from worker.audit import AuditTrail
from worker.dlq import DeadLetterStore
from worker.ingest import IngestConsumer
from worker.ingest_format import InvalidMessage, parse_entry
from worker.ratelimit import RatePolicy
from worker.store import ResultStore

STREAM = "fiscal:results"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RedisServer]:
    directory = tmp_path_factory.mktemp("redis-hostile")
    srv = RedisServer(directory)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def consumer(server: RedisServer) -> tuple[IngestConsumer, list, redis.Redis]:
    text = server.client()
    published: list = []
    c = IngestConsumer(
        redis_client=server.client(decode=False),
        stream=STREAM,
        consumer="test-consumer",
        store=ResultStore(text, rate=RatePolicy()),
        dlq=DeadLetterStore(text),
        audit=AuditTrail(text, ttl_seconds=3600, max_attempts=10),
        publish=lambda *args: published.append(args),
        queue_has_room=lambda: True,
        block_ms=10,
    )
    c.ensure_group()
    return c, published, text


def settle_one(consumer, text: redis.Redis, fields: dict) -> tuple[str, dict | None]:
    c, published, _ = consumer
    text.delete(keys.DLQ_INDEX)  # look only at what this entry produced
    before = len(published)
    entry_id = c.redis.xadd(STREAM, fields).decode()
    assert c.poll() == 1
    assert text.xlen(STREAM) == 0, "settled entries are acknowledged and deleted"
    assert text.xpending(STREAM, keys.INGEST_GROUP)["pending"] == 0
    ids = text.zrange(keys.DLQ_INDEX, 0, -1)
    if ids:
        assert len(published) == before
        return entry_id, json.loads(text.get(keys.dlq_entry(ids[0])))
    # Accepted: recorded and scheduled (published now, or parked until its brand's slot).
    assert text.exists(keys.result(entry_id))
    assert text.zscore(keys.SCHEDULE, entry_id) is not None
    assert len(published) <= before + 1
    return entry_id, None


def expected_valid(data: bytes) -> bool:
    try:
        parse_entry(data)
    except InvalidMessage:
        return False
    return len(data) <= 64 * 1024


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
entry_like = st.fixed_dictionaries(
    {},
    optional={
        "receipt_id": st.one_of(st.integers(), st.text(max_size=5), st.floats(), st.booleans()),
        "brand": st.one_of(st.text(max_size=70), st.sampled_from(["openapitest", "a:b", "x" * 65])),
        "fiscal_id": st.one_of(st.text(max_size=140), st.integers()),
        "venue_id": st.one_of(st.integers(), st.none(), st.text(max_size=3)),
        "device_id": st.text(max_size=140),
        "printed_at": st.text(max_size=40),
        "extra": json_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    entry_like.map(lambda d: json.dumps(d).encode()),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=payloads)
def test_any_payload_is_accepted_or_dead_lettered_intact(consumer, data):
    entry_id, entry = settle_one(consumer, consumer[2], {b"data": data})
    if expected_valid(data):
        assert entry is None
        return
    assert entry is not None, "an invalid entry must be dead-lettered"
    assert entry["reason"] == "invalid_message"
    assert entry["result_id"] == entry_id
    assert entry["error"] and "\n" not in entry["error"]
    if entry.get("payload_encoding") == "backslashreplace":
        assert entry["payload"] == data.decode("utf-8", "backslashreplace")
    else:
        assert entry["payload"].encode("utf-8", "surrogateescape") == data


def test_entry_without_data_field_is_dead_lettered_with_what_it_had(consumer):
    _, entry = settle_one(consumer, consumer[2], {b"receipt_id": b"1", b"brand": b"x"})
    assert entry["reason"] == "invalid_message"
    assert "no 'data' field" in entry["error"]
    assert "receipt_id=1" in entry["payload"]


def test_huge_entry_is_not_parsed_and_kept_as_the_contract_says(consumer):
    data = (
        b'{"receipt_id": 1, "brand": "openapitest", "fiscal_id": "'
        + b"A" * (2 * 1024 * 1024)
        + b'"}'
    )
    _, entry = settle_one(consumer, consumer[2], {b"data": data})
    assert entry["reason"] == "invalid_message"
    assert "over the 65536-byte limit" in entry["error"]
    assert entry["payload_truncated"] is True
    assert entry["payload_bytes"] == len(data)
    assert entry["payload_sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["payload"].encode() == data[: 64 * 1024]


def test_entry_between_64kib_and_1mib_is_kept_whole(consumer):
    data = json.dumps(
        {"receipt_id": 1, "brand": "b", "fiscal_id": "F", "pad": "x" * 200_000}
    ).encode()
    _, entry = settle_one(consumer, consumer[2], {b"data": data})
    assert entry["payload_truncated"] is False
    assert entry["payload"].encode() == data


def test_valid_entry_with_unknown_fields_is_accepted_and_replay_field_ignored(consumer):
    data = json.dumps(
        {"receipt_id": 5, "brand": "openapitest", "fiscal_id": "F", "firmware": "1.2"}
    )
    _, entry = settle_one(consumer, consumer[2], {b"data": data.encode(), b"replay_of": b"dl-1"})
    assert entry is None


HOSTILE = [
    b"\xff\xfe\x00garbage",
    b"not json at all",
    b"[1, 2, 3]",
    b'{"receipt_id": "12", "brand": "openapitest", "fiscal_id": "F"}',
    b'{"receipt_id": 1, "brand": "\\u001b[31mred\\u0000", "fiscal_id": "F"}',
    b'{"receipt_id": 1, "brand": "openapitest"}',
    b"[" * 100_000,
    b'{"receipt_id": 1e400, "brand": "b", "fiscal_id": "F"}',
]


def test_worker_survives_a_hostile_batch_and_keeps_working(r, fake, start_worker):
    fake.add_receipt("openapitest", closed(41))
    worker = start_worker()
    for data in HOSTILE:
        r.xadd(STREAM, {"data": data})
    r.xadd(
        STREAM,
        {"data": json.dumps({"receipt_id": 41, "brand": "openapitest", "fiscal_id": "F-41"})},
    )
    wait_finished(r, timeout=30)
    entries = dlq_entries(r)
    assert sorted(e["reason"] for e in entries) == ["invalid_message"] * len(HOSTILE)
    kept = {
        e["payload"].encode("utf-8", "surrogateescape")
        for e in entries
        if e["payload_encoding"] == "utf-8"
    }
    assert kept == {d for d in HOSTILE if d != HOSTILE[0]}
    assert patches(fake, "openapitest", 41) == [{"fiscal_id": "F-41", "lock": True}]
    assert worker.process is not None and worker.process.poll() is None
    assert "Traceback" not in worker.log()
