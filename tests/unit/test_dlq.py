"""The dead-letter store (contract §5), on fakeredis."""

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


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def store(redis: fakeredis.FakeRedis) -> DeadLetterStore:
    return DeadLetterStore(redis, max_entries=1000)


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
        result_id="res-1",
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
        entry_id = add(store, pipeline=pipe, result_id="res-1")
        pipe.zrem(keys.SCHEDULE, "res-1")
        assert store.get(entry_id) is None  # nothing visible before EXEC
        assert redis.zcard(keys.DLQ_INDEX) == 0
        pipe.execute()
    assert store.get(entry_id) is not None
    assert redis.zcard(keys.SCHEDULE) == 0
    assert_consistent(store, redis)


def test_add_on_a_pipeline_keeps_the_bound(redis: fakeredis.FakeRedis) -> None:
    store = DeadLetterStore(redis, max_entries=2)
    for _ in range(4):
        with redis.pipeline(transaction=True) as pipe:
            add(store, pipeline=pipe)
            pipe.execute()
    assert [e["id"] for e in store.list()] == ["dl-4", "dl-3"]
    assert store.stats()["trimmed"] == 2


# --- the bound -------------------------------------------------------------------------


def test_trimming_removes_the_oldest_first(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeadLetterStore(redis, max_entries=5)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        for i in range(8):
            add(store, reason=REASONS[i % 3], brand=f"b{i % 2}")
    assert [e["id"] for e in store.list()] == ["dl-8", "dl-7", "dl-6", "dl-5", "dl-4"]
    for gone in ("dl-1", "dl-2", "dl-3"):
        assert store.get(gone) is None
        assert redis.exists(keys.dlq_entry(gone)) == 0
    stats = store.stats()
    assert stats["total"] == 5
    assert stats["trimmed"] == 3
    assert sum(stats["by_reason"].values()) == sum(stats["by_brand"].values()) == 5
    assert_consistent(store, redis)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["dlq_trimmed count=1 max_entries=5"] * 3


def test_trim_after_lowering_the_bound_logs_one_line(
    redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(10):
        add(DeadLetterStore(redis, max_entries=100))
    store = DeadLetterStore(redis, max_entries=4)
    with caplog.at_level(logging.WARNING, logger="worker.dlq"):
        assert store.trim() == 6
    assert [r.getMessage() for r in caplog.records] == ["dlq_trimmed count=6 max_entries=4"]
    assert store.count() == 4
    assert redis.get(keys.DLQ_TRIMMED) == "6"
    assert_consistent(store, redis)


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
    assert store.stats() == {
        "total": 2,
        "by_reason": {"receipt_not_found": 2},
        "by_brand": {"b": 2},
        "trimmed": 0,
    }


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
    assert store.stats() == {"total": 0, "by_reason": {}, "by_brand": {}, "trimmed": 0}
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
