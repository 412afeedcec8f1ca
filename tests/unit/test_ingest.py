"""The ingest consumer over fakeredis (its Lua runs the scripts), in bursts: what is settled
and acknowledged, what stays pending when Redis refuses writes, the poison rule, the read
size bound, and pruning dead consumers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import fakeredis.model._stream as fake_stream
import pytest
import redis
from fakeredis._helpers import SimpleError
from fakeredis._socket import FakeSocket
from fakeredis._socket._resp import extract_command
from support import Clock

from worker import keys
from worker.audit import AuditTrail
from worker.dlq import DeadLetterStore
from worker.ingest import MAX_DELIVERIES, IngestConsumer
from worker.ratelimit import RatePolicy
from worker.store import ResultStore

STREAM = "fiscal:results"
MIB = 1024 * 1024
POLICY = RatePolicy(limit=100_000, window=60, margin=0, lead=60)  # every result has a slot now
OOM = "OOM command not allowed when used memory > 'maxmemory'."
# Commands Redis refuses at maxmemory under noeviction (`denyoom`), of those a worker sends.
DENYOOM = frozenset(
    {
        *("set", "setnx", "setex", "psetex", "mset", "getset", "append", "copy", "restore"),
        *("incr", "incrby", "incrbyfloat", "decr", "decrby"),
        *("hset", "hsetnx", "hmset", "hincrby", "hincrbyfloat", "zadd", "zincrby", "sadd"),
        *("lpush", "rpush", "lpushx", "rpushx", "linsert", "lset"),
        *("xadd", "xgroup create", "xgroup createconsumer"),
    }
)
TRANSACTION_CONTROL = frozenset({"multi", "exec", "discard", "watch", "unwatch"})


# --- a Redis at maxmemory ---------------------------------------------------------------------
@dataclass
class Maxmemory:
    """Makes fakeredis answer as Redis at maxmemory under `noeviction` does: a denyoom command
    is refused, alone or from a script (which fails then); in MULTI every command is refused
    and EXEC aborts the transaction. XREADGROUP, XAUTOCLAIM, XACK, XDEL, reads still pass.
    `only` narrows the refusal to the commands it matches (full or not)."""

    full: bool = False
    only: Callable[[str, list[Any]], bool] | None = None
    refused: list[str] = field(default_factory=list)

    def refuses(self, cmd: str, args: list[Any], queued: bool) -> bool:
        if self.only is not None:
            hit = self.only(cmd, args)
        else:
            hit = self.full and (cmd in DENYOOM or (queued and cmd not in TRANSACTION_CONTROL))
        if hit:
            self.refused.append(cmd)
        return hit


@pytest.fixture
def maxmemory(monkeypatch: pytest.MonkeyPatch) -> Maxmemory:
    state = Maxmemory()
    process, lua_call = FakeSocket._process_command, FakeSocket._lua_redis_call

    def process_command(sock: Any, fields: list[bytes]) -> None:
        if fields:
            cmd, args = extract_command(fields)
            queued = bool(sock._queueing)
            if state.refuses(cmd, list(args), queued):
                if queued:
                    sock._transaction_failed = True  # EXEC answers EXECABORT
                sock.put_response(sock._decode_error(SimpleError(OOM)))
                return
        process(sock, fields)

    def lua_redis_call(sock: Any, runtime: Any, expected: Any, op: Any, *args: Any) -> Any:
        cmd = (op.decode() if isinstance(op, bytes) else str(op)).lower()
        if state.refuses(cmd, list(args), False):
            raise SimpleError(OOM)
        return lua_call(sock, runtime, expected, op, *args)

    monkeypatch.setattr(FakeSocket, "_process_command", process_command)
    monkeypatch.setattr(FakeSocket, "_lua_redis_call", lua_redis_call)
    return state


def creates_of(entry_ids: set[str]) -> Callable[[str, list[Any]], bool]:
    """Refuse recording these entries' results (the create script's HSET on their hash)."""
    result_keys = {keys.result(e).encode() for e in entry_ids}

    def match(cmd: str, args: list[Any]) -> bool:
        key = args[0] if args else b""
        key = key.encode() if isinstance(key, str) else bytes(key)
        return cmd == "hset" and key in result_keys

    return match


# --- the rig ----------------------------------------------------------------------------------
@dataclass
class Rig:
    raw: redis.Redis
    text: redis.Redis
    store: ResultStore
    dlq: DeadLetterStore
    clock: Clock
    published: list[tuple[Any, ...]] = field(default_factory=list)
    publish_error: Exception | None = None

    def publish(self, *args: Any) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        self.published.append(args)

    def consumer(self, name: str = "c1", **overrides: Any) -> IngestConsumer:
        options: dict[str, Any] = {
            "redis_client": self.raw,
            "stream": STREAM,
            "consumer": name,
            "store": self.store,
            "dlq": self.dlq,
            "audit": AuditTrail(self.text, ttl_seconds=3600, max_attempts=10),
            "publish": self.publish,
            "queue_has_room": lambda: True,
            "claim_idle_seconds": 0,  # reclaim() takes over whatever is pending at once
            "block_ms": 5,
            "clock": self.clock,
        }
        options.update(overrides)
        c = IngestConsumer(**options)
        c.ensure_group()
        return c

    def add(self, data: bytes | str | dict[str, Any], **fields: bytes) -> str:
        payload = json.dumps(data) if isinstance(data, dict) else data
        return self.raw.xadd(STREAM, {"data": payload, **fields}).decode()

    def pending(self) -> dict[str, int]:
        rows = self.text.xpending_range(STREAM, keys.INGEST_GROUP, min="-", max="+", count=1000)
        return {row["message_id"]: row["times_delivered"] for row in rows}

    def in_stream(self) -> set[str]:
        return {eid for eid, _ in self.text.xrange(STREAM)}

    def dead_letters(self) -> list[dict[str, Any]]:
        ids = self.text.zrange(keys.DLQ_INDEX, 0, -1)
        return [json.loads(self.text.get(keys.dlq_entry(i))) for i in ids]

    def recorded(self) -> set[str]:
        return set(self.text.zrange(keys.SCHEDULE, 0, -1))

    def published_rids(self) -> list[str]:
        return [args[0] for args in self.published]


@pytest.fixture
def rig() -> Iterator[Rig]:
    server = fakeredis.FakeServer()
    text = fakeredis.FakeRedis(server=server, decode_responses=True)
    raw = fakeredis.FakeRedis(server=server, decode_responses=False)
    yield Rig(
        raw=raw,
        text=text,
        store=ResultStore(text, rate=POLICY),
        dlq=DeadLetterStore(text),
        clock=Clock(),
    )


def valid(receipt_id: int, brand: str = "openapitest", **extra: Any) -> dict[str, Any]:
    return {"receipt_id": receipt_id, "brand": brand, "fiscal_id": f"F-{receipt_id}", **extra}


def assert_settled_once(rig: Rig, entry_ids: list[str]) -> None:
    """Every entry recorded and published exactly once, nothing left in the stream."""
    assert rig.recorded() >= set(entry_ids)
    assert sorted(rig.published_rids()) == sorted(entry_ids)
    assert rig.in_stream() == set()
    assert rig.pending() == {}


# --- the plain cases --------------------------------------------------------------------------
def test_valid_entries_are_recorded_published_and_acknowledged(rig: Rig) -> None:
    consumer = rig.consumer()
    ids = [rig.add(valid(n)) for n in range(1, 6)]
    assert consumer.poll() == 5
    assert_settled_once(rig, ids)
    assert rig.text.hgetall(keys.result(ids[0]))["receipt_id"] == "1"
    assert int(rig.text.hget(keys.COUNTERS, "received")) == 5
    assert rig.dead_letters() == []


def test_invalid_entries_are_dead_lettered_with_raw_payload_and_acknowledged(rig: Rig) -> None:
    consumer = rig.consumer()
    bad = [b"\xff\xfe not utf-8", b"[1, 2]", json.dumps({"receipt_id": 1}).encode()]
    bad_ids = [rig.add(data) for data in bad]
    good = rig.add(valid(7))
    assert consumer.poll() == 4
    letters = {entry["result_id"]: entry for entry in rig.dead_letters()}
    assert set(letters) == set(bad_ids)
    for entry_id, data in zip(bad_ids, bad, strict=True):
        entry = letters[entry_id]
        assert entry["reason"] == "invalid_message"
        if entry["payload_encoding"] == "utf-8":
            assert entry["payload"].encode() == data
        else:
            assert entry["payload"] == data.decode("utf-8", "backslashreplace")
    assert_settled_once(rig, [good])


# --- Redis refusing writes --------------------------------------------------------------------
def test_entries_stay_pending_while_redis_refuses_writes_then_settle_once(
    rig: Rig, maxmemory: Maxmemory
) -> None:
    consumer = rig.consumer()
    ids = [rig.add(valid(n)) for n in range(1, 9)]
    maxmemory.full = True
    assert consumer.poll() == 8
    assert maxmemory.refused, "the fake Redis did refuse the writes"
    assert set(rig.pending()) == set(ids), "nothing is acknowledged"
    assert rig.in_stream() == set(ids)
    assert rig.recorded() == set() and rig.published == [] and rig.dead_letters() == []

    for _ in range(MAX_DELIVERIES + 2):  # far more deliveries than the poison bound
        assert consumer.reclaim() == 8
    assert min(rig.pending().values()) > MAX_DELIVERIES
    assert rig.dead_letters() == [] and rig.recorded() == set()

    maxmemory.full = False  # memory freed
    assert consumer.reclaim() == 8
    assert_settled_once(rig, ids)
    assert rig.dead_letters() == []
    assert int(rig.text.hget(keys.COUNTERS, "received")) == 8
    assert consumer.reclaim() == 0 and consumer.poll() == 0
    assert len(rig.published) == 8


def test_invalid_entry_refused_during_the_outage_is_dead_lettered_once_after(
    rig: Rig, maxmemory: Maxmemory
) -> None:
    consumer = rig.consumer()
    bad = rig.add(b"not json")
    good = rig.add(valid(1))
    maxmemory.full = True
    consumer.poll()
    for _ in range(MAX_DELIVERIES + 1):
        consumer.reclaim()
    assert set(rig.pending()) == {bad, good}
    assert rig.dead_letters() == []
    maxmemory.full = False
    consumer.reclaim()
    consumer.reclaim()
    letters = rig.dead_letters()
    assert [entry["result_id"] for entry in letters] == [bad]
    assert letters[0]["payload"] == "not json"
    assert "could not be settled" not in letters[0]["error"]
    assert_settled_once(rig, [good])


def test_a_mixed_batch_settles_the_entries_redis_accepts(rig: Rig, maxmemory: Maxmemory) -> None:
    consumer = rig.consumer()
    ids = [rig.add(valid(n)) for n in range(1, 7)]
    invalid = rig.add(b"{}")
    refused = {ids[1], ids[4]}
    maxmemory.only = creates_of(refused)
    assert consumer.poll() == 7
    landed = [e for e in ids if e not in refused]
    assert rig.recorded() == set(landed)
    assert sorted(rig.published_rids()) == sorted(landed)
    assert set(rig.pending()) == refused == rig.in_stream()
    assert [entry["result_id"] for entry in rig.dead_letters()] == [invalid]
    for _ in range(MAX_DELIVERIES + 1):  # refused again and again, dead letters still accepted
        assert consumer.reclaim() == 2
    assert min(rig.pending().values()) > MAX_DELIVERIES
    assert [entry["result_id"] for entry in rig.dead_letters()] == [invalid]

    maxmemory.only = None
    assert consumer.reclaim() == 2
    assert_settled_once(rig, ids)
    assert [entry["result_id"] for entry in rig.dead_letters()] == [invalid]


def test_recorded_results_are_acknowledged_even_when_the_transaction_is_refused(
    rig: Rig, maxmemory: Maxmemory
) -> None:
    """Redis refuses a whole MULTI at maxmemory; a result already recorded is acknowledged
    with plain XDEL + XACK (which also frees the memory its entry held)."""
    consumer = rig.consumer()
    ids = [rig.add(valid(n)) for n in range(1, 4)]
    maxmemory.only = lambda cmd, args: cmd == "hincrby" and args[:1] == [keys.COUNTERS.encode()]
    assert consumer.poll() == 3
    assert "hincrby" in maxmemory.refused
    assert_settled_once(rig, ids)


# --- the poison rule --------------------------------------------------------------------------
def test_entry_our_code_fails_on_is_dead_lettered_once_after_max_deliveries(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = rig.consumer()
    before = [rig.add(valid(1)), rig.add(valid(2))]
    poison_data = json.dumps(valid(3, note="trips a bug"))
    poison = rig.add(poison_data)
    after = [rig.add(valid(4))]
    create = rig.store.create

    def buggy_create(rid: str, *args: Any, **kwargs: Any) -> bool:
        if rid == poison:
            raise KeyError("a bug of ours on this input")
        return create(rid, *args, **kwargs)

    monkeypatch.setattr(rig.store, "create", buggy_create)
    assert consumer.poll() == 4
    assert rig.recorded() == set(before + after)
    assert rig.pending() == {poison: 1}

    while rig.pending().get(poison, 0) < MAX_DELIVERIES:
        consumer.reclaim()
        assert rig.dead_letters() == [], "not before it was delivered more than the bound"
    assert rig.pending() == {poison: MAX_DELIVERIES}
    assert consumer.reclaim() == 1  # delivery MAX_DELIVERIES + 1
    letters = rig.dead_letters()
    assert len(letters) == 1
    assert letters[0]["reason"] == "invalid_message"
    assert letters[0]["result_id"] == poison
    assert letters[0]["payload"] == poison_data
    assert "KeyError" in letters[0]["error"]
    assert rig.in_stream() == set() and rig.pending() == {}
    assert consumer.reclaim() == 0
    assert len(rig.dead_letters()) == 1
    assert sorted(rig.published_rids()) == sorted(before + after)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("broker said no"), redis.exceptions.OutOfMemoryError(OOM)],
    ids=["non-redis", "redis"],
)
def test_publish_failure_after_create_still_acknowledges(rig: Rig, error: Exception) -> None:
    consumer = rig.consumer()
    rig.publish_error = error
    ids = [rig.add(valid(n)) for n in (1, 2)]
    assert consumer.poll() == 2
    assert rig.recorded() == set(ids), "in the schedule: the dispatcher re-drives them"
    assert rig.in_stream() == set() and rig.pending() == {}
    assert rig.dead_letters() == []
    for rid in ids:  # only the short publish lease: it lapses and the dispatcher publishes
        assert rig.text.zscore(keys.SCHEDULE, rid) == pytest.approx(
            rig.clock.now + rig.store.publish_lease
        )


# --- the read bound ---------------------------------------------------------------------------
def reply_bytes(value: Any) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, dict):
        return sum(reply_bytes(k) + reply_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(reply_bytes(v) for v in value)
    return 0


@pytest.fixture
def reads(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(command, bytes of its reply) for every command the consumer's raw client sends."""
    seen: list[tuple[str, int]] = []
    execute = rig.raw.execute_command

    def spy(*args: Any, **options: Any) -> Any:
        reply = execute(*args, **options)
        seen.append((str(args[0]), reply_bytes(reply)))
        return reply

    monkeypatch.setattr(rig.raw, "execute_command", spy)
    return seen


def test_no_read_brings_more_than_the_bound(rig: Rig, reads: list[tuple[str, int]]) -> None:
    consumer = rig.consumer()  # the default bound, INGEST_READ_BYTES (8 MiB)
    big = [rig.add(b"x" * (MIB - 100)) for _ in range(30)]  # over the entry limit: dead letters
    settled = 0
    while settled < 30:
        read = consumer.poll()
        assert read, "every poll makes progress"
        settled += read
    largest = max(size for _, size in reads)
    assert largest <= consumer.read_bytes + 100 * 64  # the bound, plus the entries' ids
    assert largest > consumer.read_bytes // 2, "batches are still large"
    assert sum(1 for command, size in reads if size > MIB) >= 4, "30 MiB took several reads"
    assert {entry["result_id"] for entry in rig.dead_letters()} == set(big)
    assert all("over the 65536-byte limit" in e["error"] for e in rig.dead_letters())
    assert rig.in_stream() == set() and rig.pending() == {}


def test_small_bound_valid_entries_land_and_a_larger_entry_is_read_alone(
    rig: Rig, reads: list[tuple[str, int]]
) -> None:
    bound = 100_000
    consumer = rig.consumer(read_bytes=bound)
    ids = [rig.add(valid(n, pad="p" * 30_000)) for n in range(1, 13)]
    huge = rig.add(b"y" * (3 * bound))  # larger than the bound: read by itself
    ids += [rig.add(valid(n, pad="p" * 30_000)) for n in range(13, 16)]
    while rig.in_stream():
        assert consumer.poll()
    over = [(command, size) for command, size in reads if size > bound + 1000]
    assert len(over) == 1 and over[0][1] < 3 * bound + 1000, "only the huge entry, alone"
    assert_settled_once(rig, ids)
    assert [entry["result_id"] for entry in rig.dead_letters()] == [huge]


def test_reclaim_is_bounded_too(rig: Rig, reads: list[tuple[str, int]]) -> None:
    bound = 100_000
    reader = rig.consumer("dead-pod", read_bytes=10 * bound)
    ids = [rig.add(valid(n, pad="p" * 30_000)) for n in range(1, 11)]
    reader._read("new", 100, 10 * bound)  # read, never settled: a pod that died here
    assert len(rig.pending()) == 10
    reads.clear()
    consumer = rig.consumer("live", read_bytes=bound)
    while rig.pending():
        assert consumer.reclaim()
    assert max(size for _, size in reads) <= bound + 1000
    assert_settled_once(rig, ids)


def test_idle_poll_blocks_and_then_reads(rig: Rig) -> None:
    consumer = rig.consumer()
    assert consumer.poll() == 0
    entry_id = rig.add(valid(1))
    assert consumer.poll() == 1
    assert_settled_once(rig, [entry_id])


# --- dead consumers ---------------------------------------------------------------------------
def test_prune_consumers_removes_idle_consumers_with_nothing_pending(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1_000_000_000]
    monkeypatch.setattr(fake_stream, "current_time", lambda: now[0])
    me = rig.consumer("host-a:1")
    for name in ("host-a:1", "host-b:2", "host-c:3", "host-d:4"):
        rig.raw.xgroup_createconsumer(STREAM, keys.INGEST_GROUP, name)
    rig.add(valid(1))
    rig.raw.xreadgroup(keys.INGEST_GROUP, "host-c:3", {STREAM: ">"}, count=1)  # dies holding it
    now[0] += 2 * 3600 * 1000  # two hours on
    rig.raw.xreadgroup(keys.INGEST_GROUP, "host-d:4", {STREAM: ">"}, count=1)  # alive, reading
    now[0] += 1000

    with caplog.at_level(logging.INFO, logger="worker.ingest"):
        assert me.prune_consumers(idle_seconds=3600) == 1
    names = {c["name"].decode() for c in rig.raw.xinfo_consumers(STREAM, keys.INGEST_GROUP)}
    assert names == {"host-a:1", "host-c:3", "host-d:4"}  # itself, the pending one, the live one
    assert "event=ingest_consumers_pruned count=1" in caplog.text
    assert len(rig.pending()) == 1, "the dead pod's entry is still there for reclaim()"
    assert me.prune_consumers(idle_seconds=3600) == 0
