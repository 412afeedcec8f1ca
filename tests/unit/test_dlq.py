"""The dead-letter store (docs/interface.md, Dead-letter store and CLI), on fakeredis."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

import fakeredis
import pytest

from worker import dlq, keys
from worker.dlq import (
    MAX_PAYLOAD_BYTES,
    REASONS,
    TRUNCATED_PAYLOAD_BYTES,
    DeadLetterStore,
    ReplayError,
)
from worker.ingest_format import parse_entry

CONTRACT_FIELDS = {
    "id", "reason", "receipt_id", "brand", "fiscal_id", "attempts", "first_seen",
    "last_seen", "error", "http_status", "payload", "payload_truncated", "payload_bytes",
    "payload_sha256", "result", "result_id",
}  # fmt: skip
GOOD_PAYLOAD = '{"receipt_id": 7, "brand": "acme", "fiscal_id": "F-7"}'
BY_RESULT_KEYS = "fw:dlq:result:*"  # every by-result key (a pattern, for KEYS)


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def store(redis: fakeredis.FakeRedis) -> DeadLetterStore:
    return DeadLetterStore(redis)


@pytest.fixture(autouse=True)
def _fresh_over_bound_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that has not warned yet."""
    monkeypatch.setattr(dlq, "_last_over_bound_warning", float("-inf"))


def add(
    store: DeadLetterStore,
    reason: str = "unknown_brand",
    brand: str | None = "acme",
    receipt_id: int = 7,
    payload: str | bytes | None = None,
    **more: object,
) -> str:
    if payload is None:
        payload = json.dumps({"receipt_id": receipt_id, "brand": brand, "fiscal_id": "F-7"})
    return store.add(
        reason=reason,
        payload=payload,
        error=f"{reason} happened",
        brand=brand,
        receipt_id=receipt_id,
        fiscal_id="F-7",
        **more,
    )


def assert_consistent(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    """Indexes, counts and entries all agree."""
    index = set(redis.zrange(keys.DLQ_INDEX, 0, -1))
    entries = {i: store.get(i) for i in index}
    assert all(entries.values()), "every indexed id has an entry"
    assert len(redis.keys(keys.dlq_entry("*"))) == len(index)
    by_reason: dict[str, int] = {}
    by_brand: dict[str, int] = {}
    for entry_id, entry in entries.items():
        assert entry is not None
        brand_key = entry["brand"] if entry["brand"] and ":" not in entry["brand"] else ""
        assert redis.zscore(keys.dlq_by_reason(entry["reason"]), entry_id) is not None
        assert redis.zscore(keys.dlq_by_brand(brand_key), entry_id) is not None
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
        by_brand[brand_key] = by_brand.get(brand_key, 0) + 1
    stats = store.stats()
    assert stats["total"] == len(index)
    assert stats["by_reason"] == by_reason
    assert stats["by_brand"] == by_brand
    for reason in REASONS:
        assert redis.zcard(keys.dlq_by_reason(reason)) == by_reason.get(reason, 0)
    assert stats["bytes"] == stored_bytes(redis)
    has_result_id = [i for i, e in entries.items() if e and e["result_id"] is not None]
    with_result_id = {entries[i]["result_id"]: i for i in has_result_id}  # type: ignore[index]
    assert len(with_result_id) == len(has_result_id)  # one entry per result id
    for result_id, entry_id in with_result_id.items():
        assert redis.get(keys.dlq_by_result(result_id)) == entry_id
    assert len(redis.keys(BY_RESULT_KEYS)) == len(with_result_id)


def stored_bytes(redis: fakeredis.FakeRedis) -> int:
    """The size of every stored entry JSON string, as Redis counts it (STRLEN)."""
    return sum(redis.strlen(key) for key in redis.keys(keys.dlq_entry("*")))


def over_bound_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("event=dlq_over_bound ")
    ]


# --- adding ----------------------------------------------------------------------------


def test_entry_has_the_contract_fields(store: DeadLetterStore) -> None:
    entry_id = store.add(
        reason="validation_failed",
        payload=GOOD_PAYLOAD,
        error="PATCH 400: fiscal_id too long",
        receipt_id=7,
        brand="acme",
        fiscal_id="F-7",
        attempts=3,
        first_seen=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        last_seen="2024-05-01T16:05:00+04:00",
        http_status=400,
        rid="res-1",
    )
    assert entry_id == "dl-1"
    entry = store.get(entry_id)
    assert entry is not None
    assert set(entry) >= CONTRACT_FIELDS
    assert entry["id"] == "dl-1"
    assert entry["reason"] == "validation_failed"
    assert (entry["receipt_id"], entry["brand"], entry["fiscal_id"]) == (7, "acme", "F-7")
    assert entry["attempts"] == 3
    assert entry["first_seen"] == "2024-05-01T12:00:00.000Z"
    assert entry["last_seen"] == "2024-05-01T12:05:00.000Z"
    assert entry["error"] == "PATCH 400: fiscal_id too long"
    assert entry["http_status"] == 400
    assert entry["payload"] == GOOD_PAYLOAD
    assert entry["payload_truncated"] is False
    assert entry["payload_bytes"] == len(GOOD_PAYLOAD)
    assert entry["payload_sha256"] is None
    assert entry["payload_encoding"] == "utf-8"
    assert entry["result"] is None
    assert entry["result_id"] == "res-1"


def test_ids_count_up(store: DeadLetterStore) -> None:
    assert [add(store) for _ in range(3)] == ["dl-1", "dl-2", "dl-3"]


def test_times_default_to_now(store: DeadLetterStore) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    entry = store.get(add(store))
    assert entry is not None
    assert entry["first_seen"] == entry["last_seen"]
    assert entry["first_seen"].endswith("Z")
    seen = datetime.fromisoformat(entry["first_seen"].replace("Z", "+00:00"))
    assert before <= seen <= datetime.now(UTC)


def test_unknown_reason_is_rejected(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValueError, match="unknown dead-letter reason"):
        store.add(reason="oops", payload="{}", error="x")
    assert redis.keys("*") == []


def test_parsed_result_is_kept_with_extras(store: DeadLetterStore) -> None:
    data = '{"receipt_id": 9, "brand": "acme", "fiscal_id": "F", "device_id": "p", "table": 4}'
    entry_id = store.add(
        reason="fiscal_id_conflict", payload=data, error="x", result=parse_entry(data)
    )
    entry = store.get(entry_id)
    assert entry is not None
    assert entry["result"]["device_id"] == "p"
    assert entry["result"]["table"] == 4
    # identity fields default to the result's
    assert (entry["receipt_id"], entry["brand"], entry["fiscal_id"]) == (9, "acme", "F")


def test_payload_kept_whole_up_to_one_mib(store: DeadLetterStore) -> None:
    payload = "x" * MAX_PAYLOAD_BYTES
    entry = store.get(store.add(reason="invalid_message", payload=payload, error="too big"))
    assert entry is not None
    assert entry["payload"] == payload
    assert entry["payload_truncated"] is False
    assert entry["payload_bytes"] == MAX_PAYLOAD_BYTES
    assert entry["payload_sha256"] is None


@pytest.mark.parametrize("as_bytes", [False, True])
def test_payload_over_one_mib_is_truncated(store: DeadLetterStore, as_bytes: bool) -> None:
    payload = "".join(chr(ord("a") + i % 26) for i in range(MAX_PAYLOAD_BYTES + 1))
    raw = payload.encode()
    entry_id = store.add(
        reason="invalid_message", payload=raw if as_bytes else payload, error="too big"
    )
    entry = store.get(entry_id)
    assert entry is not None
    assert entry["payload_truncated"] is True
    assert entry["payload"] == payload[:TRUNCATED_PAYLOAD_BYTES]
    assert entry["payload_bytes"] == MAX_PAYLOAD_BYTES + 1
    assert entry["payload_sha256"] == hashlib.sha256(raw).hexdigest()


def test_truncation_never_splits_a_character(store: DeadLetterStore) -> None:
    payload = "x" + "é" * (MAX_PAYLOAD_BYTES // 2)  # the 64 KiB cut falls inside an "é"
    entry = store.get(store.add(reason="invalid_message", payload=payload, error="big"))
    assert entry is not None
    kept = entry["payload"].encode()
    assert payload.encode().startswith(kept)
    assert TRUNCATED_PAYLOAD_BYTES - 2 < len(kept) <= TRUNCATED_PAYLOAD_BYTES
    assert entry["payload_bytes"] == len(payload.encode())


def test_non_utf8_payload_is_kept_escaped(store: DeadLetterStore) -> None:
    raw = b'{"brand": "\xff\xfeacme"}'
    entry = store.get(store.add(reason="invalid_message", payload=raw, error="not UTF-8"))
    assert entry is not None
    assert entry["payload"] == '{"brand": "\\xff\\xfeacme"}'
    assert entry["payload_encoding"] == "backslashreplace"
    assert entry["payload_bytes"] == len(raw)
    assert entry["payload_truncated"] is False


def test_surrogateescaped_str_payload_counts_original_bytes(store: DeadLetterStore) -> None:
    raw = b"abc\xff"
    entry = store.get(
        store.add(
            reason="invalid_message", payload=raw.decode("utf-8", "surrogateescape"), error="x"
        )
    )
    assert entry is not None
    assert entry["payload"] == "abc\\xff"
    assert entry["payload_bytes"] == 4


def test_hostile_brand_builds_no_key(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    for brand in ("evil:brand", "x" * 65, "a\nb", "*"):
        store.add(reason="invalid_message", payload="{", error="bad", brand=brand)
    assert not [k for k in redis.keys("*") if "evil" in k or "xxxx" in k or "\n" in k]
    assert redis.zcard(keys.dlq_by_brand("")) == 4
    assert store.stats()["by_brand"] == {"": 4}
    assert store.list(brand="evil:brand") == []
    assert store.count(brand="evil:brand") == 0
    assert len(store.list(brand="")) == 4
    assert store.list()[-1]["brand"] == "evil:brand"  # shown as sent, indexed as ''


def test_unknown_brand_is_indexed_as_empty(store: DeadLetterStore) -> None:
    store.add(reason="invalid_message", payload="nope", error="not JSON")
    assert store.stats()["by_brand"] == {"": 1}
    entry = store.list()[0]
    assert entry["brand"] is None and entry["fiscal_id"] is None and entry["receipt_id"] is None


def test_add_is_one_transaction(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    add(store)
    assert_consistent(store, redis)


def test_add_on_a_callers_pipeline(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    redis.zadd(keys.SCHEDULE, {"res-1": 1})
    with redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        entry_id = add(store, pipeline=pipe, rid="res-1")
        pipe.zrem(keys.SCHEDULE, "res-1")
        assert store.get(entry_id) is None  # nothing visible before EXEC
        assert redis.zcard(keys.DLQ_INDEX) == 0
        pipe.execute()
    assert store.get(entry_id) is not None
    assert redis.zcard(keys.SCHEDULE) == 0
    assert_consistent(store, redis)


def test_add_on_a_pipeline_never_trims(redis: fakeredis.FakeRedis) -> None:
    store = DeadLetterStore(redis, warn_entries=2)
    for _ in range(4):
        with redis.pipeline(transaction=True) as pipe:
            add(store, pipeline=pipe)
            pipe.execute()
    assert [e["id"] for e in store.list()] == ["dl-4", "dl-3", "dl-2", "dl-1"]
    assert store.stats()["total"] == 4
    assert_consistent(store, redis)


# --- the warning bound (never a trim) --------------------------------------------------


def test_more_entries_than_warn_entries_are_all_kept_and_listed(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeadLetterStore(redis, warn_entries=5)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        for i in range(8):
            add(store, reason=REASONS[i % 3], brand=f"b{i % 2}")
    assert [e["id"] for e in store.list()] == [f"dl-{n}" for n in range(8, 0, -1)]
    assert all(store.get(f"dl-{n}") is not None for n in range(1, 9))
    stats = store.stats()
    assert stats["total"] == 8
    assert stats["over_bound"] is True
    assert (stats["warn_entries"], stats["warn_bytes"]) == (5, 1024**3)
    assert sum(stats["by_reason"].values()) == sum(stats["by_brand"].values()) == 8
    assert_consistent(store, redis)
    # the 5th add reached the bound; the later ones are within the same minute
    assert over_bound_warnings(caplog) == [
        f"event=dlq_over_bound entries=5 bytes={stats['bytes'] - sizes_of(redis, 6, 7, 8)} "
        "warn_entries=5 warn_bytes=1073741824"
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def sizes_of(redis: fakeredis.FakeRedis, *numbers: int) -> int:
    return sum(redis.strlen(keys.dlq_entry(f"dl-{n}")) for n in numbers)


def test_under_the_bound_nothing_is_logged(
    store: DeadLetterStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        for _ in range(3):
            add(store)
    assert store.stats()["over_bound"] is False
    assert caplog.records == []


def test_bytes_bound_warns_and_keeps_everything(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeadLetterStore(redis, warn_bytes=3000)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        for _ in range(3):
            add(store, payload="y" * 1000)
    stats = store.stats()
    assert stats["total"] == 3 and stats["bytes"] >= 3000
    assert stats["over_bound"] is True
    assert len(over_bound_warnings(caplog)) == 1
    assert f"bytes={stats['bytes']} " in over_bound_warnings(caplog)[0]


def test_over_bound_warning_again_after_a_minute(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(dlq.time, "monotonic", lambda: clock[0])
    store = DeadLetterStore(redis, warn_entries=1)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        add(store)
        clock[0] += 59
        add(store)
        clock[0] += 2
        add(store)
    assert [m.split(" bytes=")[0] for m in over_bound_warnings(caplog)] == [
        "event=dlq_over_bound entries=1",
        "event=dlq_over_bound entries=3",
    ]


def test_add_on_a_pipeline_warns_over_the_bound(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeadLetterStore(redis, warn_entries=2)
    add(store)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"), redis.pipeline() as pipe:
        add(store, pipeline=pipe)
        pipe.execute()
    assert store.count() == 2
    [warning] = over_bound_warnings(caplog)
    assert warning.startswith("event=dlq_over_bound entries=2 bytes=")
    assert f"bytes={stored_bytes(redis)} " in warning


def test_warn_bounds_must_be_positive(redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValueError, match="warn_entries"):
        DeadLetterStore(redis, warn_entries=0)
    with pytest.raises(ValueError, match="warn_bytes"):
        DeadLetterStore(redis, warn_bytes=0)


def test_the_store_has_no_trim(store: DeadLetterStore) -> None:
    assert not hasattr(store, "trim")
    assert not hasattr(keys, "DLQ_TRIMMED")
    assert "trimmed" not in store.stats()


# --- the size in bytes -----------------------------------------------------------------


def test_bytes_counter_follows_adds_and_every_removal(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    assert store.stats()["bytes"] == 0
    for i in range(9):
        add(store, reason="auth_failed" if i % 3 else "receipt_not_found", payload="é" * (i * 40))
    add(store, payload=GOOD_PAYLOAD, rid="1700000000000-0")
    assert store.stats()["bytes"] == stored_bytes(redis) > 0
    assert_consistent(store, redis)
    store.remove("dl-2")
    assert store.stats()["bytes"] == stored_bytes(redis)
    assert store.purge(reason="receipt_not_found") == 3
    assert store.stats()["bytes"] == stored_bytes(redis)
    assert store.replay("dl-10", stream="s") is not None
    assert store.stats()["bytes"] == stored_bytes(redis)
    assert_consistent(store, redis)
    assert store.purge() == 5
    assert store.stats()["bytes"] == 0
    assert redis.exists(keys.DLQ_BYTES) == 0  # deleted at 0, never negative
    assert store.remove("dl-3") is None  # removing again changes nothing
    assert redis.exists(keys.DLQ_BYTES) == 0


def test_bytes_counter_never_goes_negative(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    entry_id = add(store)
    redis.set(keys.DLQ_BYTES, 3)  # damaged: smaller than the entry
    store.remove(entry_id)
    assert redis.exists(keys.DLQ_BYTES) == 0
    assert store.stats()["bytes"] == 0
    redis.set(keys.DLQ_BYTES, "garbage")
    assert store.stats()["bytes"] == 0
    add(store)  # a damaged counter does not stop a dead letter
    assert store.stats()["bytes"] == stored_bytes(redis)


def test_two_mib_payload_is_stored_truncated_and_its_size_counted(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    payload = "z" * (2 * 1024 * 1024)
    entry_id = store.add(reason="invalid_message", payload=payload, error="huge")
    entry = store.get(entry_id)
    assert entry is not None
    assert entry["payload_truncated"] is True
    assert entry["payload"] == payload[:TRUNCATED_PAYLOAD_BYTES]
    assert entry["payload_bytes"] == len(payload)
    assert entry["payload_sha256"] == hashlib.sha256(payload.encode()).hexdigest()
    size = store.stats()["bytes"]
    assert size == redis.strlen(keys.dlq_entry(entry_id))
    assert TRUNCATED_PAYLOAD_BYTES < size < TRUNCATED_PAYLOAD_BYTES + 2048


# --- once per result id ----------------------------------------------------------------


def test_add_twice_for_one_result_id_makes_one_entry(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    first = add(store, rid="1700000000000-0")
    second = add(store, reason="auth_failed", rid="1700000000000-0")
    assert second == first
    assert store.count() == 1
    assert store.get(first)["reason"] == "unknown_brand"  # type: ignore[index]
    other = add(store, rid="1700000000000-1")
    assert other != first and store.count() == 2
    assert_consistent(store, redis)


def test_add_twice_on_pipelines_for_one_result_id_makes_one_entry(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    ids = []
    for _ in range(2):
        with redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            ids.append(add(store, pipeline=pipe, rid="res-1"))
            pipe.hincrby(keys.COUNTERS, "dead_lettered", 1)
            pipe.execute()
    assert ids[0] == ids[1]
    assert store.count() == 1
    assert redis.hget(keys.COUNTERS, "dead_lettered") == "2"  # the caller's own writes ran
    assert_consistent(store, redis)
    assert add(store, rid="res-1") == ids[0]  # and a direct add agrees
    assert store.count() == 1


def test_two_adds_queued_in_one_multi_make_one_entry(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    with redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        first = add(store, pipeline=pipe, rid="res-1")
        second = add(store, reason="auth_failed", pipeline=pipe, rid="res-1")
        pipe.execute()
    assert second == first
    assert [e["id"] for e in store.list()] == [first]
    assert_consistent(store, redis)


def test_a_race_between_pipelines_makes_one_entry(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    # Both check before either commits (two processes): the script decides at EXEC.
    with redis.pipeline(transaction=True) as one, redis.pipeline(transaction=True) as two:
        first = add(store, pipeline=one, rid="res-1")
        second = add(store, pipeline=two, rid="res-1", reason="auth_failed")
        assert first != second
        one.execute()
        two.execute()
    assert [e["id"] for e in store.list()] == [first]
    assert store.get(second) is None
    assert_consistent(store, redis)


def test_a_discarded_pipeline_does_not_hide_a_later_add(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    pipe = redis.pipeline(transaction=True)
    add(store, pipeline=pipe, rid="res-1")
    pipe.reset()  # the caller gave up: nothing was written
    entry_id = add(store, pipeline=pipe, rid="res-1")
    pipe.execute()
    assert [e["id"] for e in store.list()] == [entry_id]


@pytest.mark.parametrize("way_out", ["remove", "purge", "replay"])
def test_after_its_entry_leaves_a_result_id_can_be_dead_lettered_again(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, way_out: str
) -> None:
    first = add(store, payload=GOOD_PAYLOAD, rid="res-1")
    if way_out == "remove":
        assert store.remove(first) is not None
    elif way_out == "purge":
        assert store.purge(reason="unknown_brand") == 1
    else:
        assert store.replay(first, stream="s") is not None
    assert redis.exists(keys.dlq_by_result("res-1")) == 0
    second = add(store, rid="res-1")
    assert second != first
    assert [e["id"] for e in store.list()] == [second]
    with redis.pipeline(transaction=True) as pipe:
        assert add(store, pipeline=pipe, rid="res-1") == second
        pipe.execute()
    assert_consistent(store, redis)


def test_a_stale_by_result_key_does_not_block_a_dead_letter(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    redis.set(keys.dlq_by_result("res-1"), "dl-99")  # names no entry in the store
    with redis.pipeline(transaction=True) as pipe:
        entry_id = add(store, pipeline=pipe, rid="res-1")
        pipe.execute()
    assert entry_id != "dl-99" and store.get(entry_id) is not None
    redis.set(keys.dlq_by_result("res-2"), "dl-99")
    other = add(store, rid="res-2")
    assert other not in ("dl-99", entry_id) and store.get(other) is not None
    assert add(store, rid="res-2") == other
    assert store.count() == 2
    assert_consistent(store, redis)


HOSTILE_RESULT_IDS = [
    "res\nid\r\x00",
    "r" * 10_000,
    "résultat-Ω-" + "\u202e",
    "*",
    "sha256:" + "0" * 64,  # looks hashed: hashed again
    "",
]


@pytest.mark.parametrize("result_id", HOSTILE_RESULT_IDS)
def test_hostile_result_id_works_and_builds_no_key_with_it(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, result_id: str
) -> None:
    first = add(store, payload=GOOD_PAYLOAD, rid=result_id)
    assert add(store, rid=result_id) == first
    with redis.pipeline(transaction=True) as pipe:
        assert add(store, pipeline=pipe, rid=result_id) == first
        pipe.execute()
    assert store.count() == 1
    assert store.get(first)["result_id"] == result_id  # type: ignore[index]
    digest = hashlib.sha256(result_id.encode()).hexdigest()
    assert keys.dlq_by_result(result_id) == f"fw:dlq:result:sha256:{digest}"
    assert redis.get(keys.dlq_by_result(result_id)) == first
    for key in redis.keys("*"):
        assert not result_id or result_id not in key, key
        assert key.isascii() and key.isprintable() and len(key) < 200, key
    assert_consistent(store, redis)
    assert store.replay(first, stream="s") is not None
    assert redis.keys(BY_RESULT_KEYS) == []


def test_result_id_key_names() -> None:
    assert keys.dlq_by_result("1700000000000-0") == "fw:dlq:result:1700000000000-0"
    assert keys.dlq_by_result("a" * 128) == "fw:dlq:result:" + "a" * 128
    assert keys.dlq_by_result("a" * 129).startswith("fw:dlq:result:sha256:")
    assert keys.dlq_by_result("x\n").startswith("fw:dlq:result:sha256:")
    # an id that looks like a hashed one cannot take that key
    hashed = keys.dlq_by_result("x\n").removeprefix("fw:dlq:result:")
    assert keys.dlq_by_result(hashed) != keys.dlq_by_result("x\n")


def test_adds_without_a_result_id_are_never_merged(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    assert add(store) != add(store)
    assert store.count() == 2
    assert redis.keys(BY_RESULT_KEYS) == []


# --- reading ---------------------------------------------------------------------------


def test_list_is_newest_first_and_pages(store: DeadLetterStore) -> None:
    for _ in range(12):
        add(store)
    assert [e["id"] for e in store.list(limit=3)] == ["dl-12", "dl-11", "dl-10"]
    assert [e["id"] for e in store.list(limit=3, offset=3)] == ["dl-9", "dl-8", "dl-7"]
    assert [e["id"] for e in store.list(limit=5, offset=10)] == ["dl-2", "dl-1"]
    assert store.list(limit=5, offset=12) == []
    assert store.list(limit=0) == []
    assert len(store.list()) == 12


def test_list_defaults_to_100(store: DeadLetterStore) -> None:
    for _ in range(105):
        add(store)
    listed = store.list()
    assert len(listed) == 100
    assert listed[0]["id"] == "dl-105" and listed[-1]["id"] == "dl-6"


def test_list_filters(store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlq, "PAGE", 2)  # walk the indexes over several pages
    for i in range(12):
        add(store, reason="auth_failed" if i % 2 else "receipt_not_found", brand=f"b{i % 3}")
    auth = [e["id"] for e in store.list(reason="auth_failed")]
    assert auth == ["dl-12", "dl-10", "dl-8", "dl-6", "dl-4", "dl-2"]
    assert [e["id"] for e in store.list(brand="b0")] == ["dl-10", "dl-7", "dl-4", "dl-1"]
    both = store.list(reason="auth_failed", brand="b0")
    assert [e["id"] for e in both] == ["dl-10", "dl-4"]
    assert [e["id"] for e in store.list(reason="auth_failed", brand="b0", offset=1)] == ["dl-4"]
    assert [e["id"] for e in store.list(reason="auth_failed", brand="b1", limit=1)] == ["dl-8"]
    assert store.list(reason="validation_failed") == []
    assert store.list(brand="nobody") == []
    assert store.count(reason="auth_failed") == 6
    assert store.count(brand="b0") == 4
    assert store.count(reason="auth_failed", brand="b0") == 2
    assert store.count() == 12


def test_unknown_reason_filter_is_an_error(store: DeadLetterStore) -> None:
    with pytest.raises(ValueError):
        store.list(reason="bogus")


def test_get_rejects_malformed_ids(store: DeadLetterStore) -> None:
    add(store)
    assert store.get("dl-1") is not None
    for bad in ("dl-0", "dl-x", "1", "dl-1:x", "*", ""):
        assert store.get(bad) is None
    assert store.get("dl-99") is None


def test_stats_omit_zero_counts(store: DeadLetterStore) -> None:
    first = add(store, reason="auth_failed", brand="a")
    add(store, reason="receipt_not_found", brand="b")
    add(store, reason="receipt_not_found", brand="b")
    store.remove(first)
    stats = store.stats()
    assert stats == {
        "total": 2,
        "bytes": stats["bytes"],
        "by_reason": {"receipt_not_found": 2},
        "by_brand": {"b": 2},
        "warn_entries": 100_000,
        "warn_bytes": 1024**3,
        "over_bound": False,
    }
    assert stats["bytes"] > 0


def test_ids_are_oldest_first_and_survive_removal(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "PAGE", 2)
    for i in range(7):
        add(store, reason="auth_failed" if i < 4 else "receipt_not_found")
    seen = []
    for entry_id in store.ids():
        seen.append(entry_id)
        store.remove(entry_id)  # removing while walking skips nothing
    assert seen == [f"dl-{n}" for n in range(1, 8)]
    assert store.count() == 0


def test_ids_do_not_include_later_entries(store: DeadLetterStore) -> None:
    add(store)
    add(store)
    walked = []
    for entry_id in store.ids():
        walked.append(entry_id)
        add(store)
    assert walked == ["dl-1", "dl-2"]


def test_ids_filtered(store: DeadLetterStore) -> None:
    add(store, reason="auth_failed", brand="a")
    add(store, reason="auth_failed", brand="b")
    add(store, reason="receipt_not_found", brand="a")
    assert list(store.ids(reason="auth_failed")) == ["dl-1", "dl-2"]
    assert list(store.ids(brand="a")) == ["dl-1", "dl-3"]
    assert list(store.ids(reason="auth_failed", brand="a")) == ["dl-1"]
    assert list(store.ids(brand="no:such")) == []


# --- removing --------------------------------------------------------------------------


def test_remove_takes_everything_away(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    entry_id = add(store, reason="auth_failed", brand="acme")
    removed = store.remove(entry_id)
    assert removed is not None and removed["id"] == entry_id
    assert store.get(entry_id) is None
    for key in (keys.DLQ_INDEX, keys.dlq_by_reason("auth_failed"), keys.dlq_by_brand("acme")):
        assert redis.zcard(key) == 0
    assert redis.hgetall(keys.DLQ_COUNTS) == {}
    assert store.remove(entry_id) is None
    assert store.remove("not-an-id") is None


def test_purge_by_filter(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    for i in range(6):
        add(store, reason="auth_failed" if i % 2 else "receipt_not_found", brand=f"b{i % 3}")
    assert store.purge(reason="auth_failed", brand="b1") == 1
    assert store.purge(reason="receipt_not_found") == 3
    assert_consistent(store, redis)
    assert store.count() == 2
    assert store.purge() == 2
    assert redis.hgetall(keys.DLQ_COUNTS) == {}
    assert redis.keys(keys.dlq_entry("*")) == []


# --- replay ----------------------------------------------------------------------------


def test_replay_writes_the_exact_payload_and_removes_the_entry(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    payload = '{"brand":"acme",  "receipt_id":7,"fiscal_id":"F-7","x":"é"}'  # spacing kept
    entry_id = store.add(reason="unknown_brand", payload=payload, error="no creds", brand="acme")
    stream_id = store.replay(entry_id, stream="fiscal:results")
    assert stream_id is not None
    assert redis.xrange("fiscal:results") == [(stream_id, {"data": payload, "replay_of": entry_id})]
    assert store.get(entry_id) is None
    assert store.stats() == {
        "total": 0,
        "bytes": 0,
        "by_reason": {},
        "by_brand": {},
        "warn_entries": 100_000,
        "warn_bytes": 1024**3,
        "over_bound": False,
    }
    assert store.replay(entry_id, stream="fiscal:results") is None
    assert redis.xlen("fiscal:results") == 1


def test_replay_of_an_entry_removed_meanwhile_writes_nothing(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_id = add(store)
    entry = store.get(entry_id)
    store.remove(entry_id)  # another operator purged it after we read it
    monkeypatch.setattr(store, "get", lambda _id: entry)
    assert store.replay(entry_id, stream="s") is None
    assert redis.exists("s") == 0


def test_truncated_payload_cannot_be_replayed(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    entry_id = store.add(
        reason="invalid_message", payload="x" * (MAX_PAYLOAD_BYTES + 5), error="big"
    )
    with pytest.raises(ReplayError) as caught:
        store.replay(entry_id, stream="s")
    assert str(caught.value) == (
        f"{entry_id}: payload was truncated ({MAX_PAYLOAD_BYTES + 5} bytes); cannot replay"
    )
    assert store.get(entry_id) is not None
    assert redis.exists("s") == 0


def test_non_utf8_payload_cannot_be_replayed(store: DeadLetterStore) -> None:
    entry_id = store.add(reason="invalid_message", payload=b"\xff", error="x")
    with pytest.raises(ReplayError, match="not valid UTF-8"):
        store.replay(entry_id, stream="s")
    assert store.get(entry_id) is not None


def test_still_invalid_payload_is_not_replayed(store: DeadLetterStore) -> None:
    entry_id = store.add(reason="invalid_message", payload='{"receipt_id": 0}', error="x")
    with pytest.raises(ReplayError, match=r"still invalid \(receipt_id: must be an integer"):
        store.replay(entry_id, stream="s")
    assert store.get(entry_id) is not None


def test_store_survives_a_new_store_object(redis: fakeredis.FakeRedis) -> None:
    entry_id = add(DeadLetterStore(redis))
    assert DeadLetterStore(redis).get(entry_id) is not None  # state lives in Redis only
