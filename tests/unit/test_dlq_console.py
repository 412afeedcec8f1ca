"""The dead-letter store's console views (worker/dlq.py: Selection, page, selected_ids,
count_selected, newest_seq, replay_many, remove_many, heads, trend), the operator
log (worker/oplog.py), `fiscal-worker dlq log`, and the log lines CLI replay / purge write."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import fakeredis
import pytest
from click.testing import CliRunner, Result

from worker import dlq, keys, redis_conn
from worker.cli import cli
from worker.cli import dlq as dlq_commands
from worker.dlq import (
    HEAD_BYTES,
    MAX_PAYLOAD_BYTES,
    DeadLetterStore,
    Page,
    Selection,
)
from worker.oplog import IDS_KEPT, MAX_WHO_CHARS, OperatorLog
from worker.settings import get_settings
from worker.testing import clean_env

STREAM = "fiscal:results"
HEAD_ONLY = {
    "payload",
    "payload_truncated",
    "payload_bytes",
    "payload_sha256",
    "payload_encoding",
    "result",
    "result_id",
}


@pytest.fixture
def redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[fakeredis.FakeRedis]:
    """A fakeredis, also behind `worker.redis_conn.redis_client` (for the CLI), default
    settings."""
    client = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(redis_conn, "redis_client", lambda *args, **kwargs: client)
    for name in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield client
    get_settings.cache_clear()


@pytest.fixture
def store(redis: fakeredis.FakeRedis) -> DeadLetterStore:
    return DeadLetterStore(redis)


@pytest.fixture(autouse=True)
def _fresh_over_bound_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlq, "_last_over_bound_warning", float("-inf"))


def add(
    store: DeadLetterStore,
    reason: str = "unknown_brand",
    brand: str | None = "acme",
    receipt_id: int | None = 7,
    payload: str | None = None,
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


def ids(page: Page) -> list[str]:
    return [entry["id"] for entry in page.entries]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, prog_name="fiscal-worker")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- Selection -------------------------------------------------------------------------


def test_selection_refuses_an_unknown_reason() -> None:
    with pytest.raises(ValueError, match="unknown dead-letter reason 'bogus'"):
        Selection(reason="bogus")


def test_selection_post_filters_only_receipt_and_time() -> None:
    assert not Selection().post_filtered
    assert not Selection(reason="auth_failed", brand="acme").post_filtered
    assert Selection(receipt_id=7).post_filtered
    assert Selection(since=at("2024-05-01T12:00:00Z")).post_filtered
    assert Selection(until=at("2024-05-01T12:00:00Z")).post_filtered


@pytest.mark.parametrize(
    ("seen", "accepted"),
    [
        ("2024-05-01T11:59:59.999Z", False),
        ("2024-05-01T12:00:00.000Z", True),  # since: inclusive
        ("2024-05-01T12:59:59.999Z", True),
        ("2024-05-01T13:00:00.000Z", False),  # until: exclusive
        ("2024-05-01T14:30:00+02:00", True),  # 12:30 UTC
        ("2024-05-01T12:30:00", True),  # no zone: UTC
        ("yesterday", False),
        (None, False),
        (1714564800, False),
    ],
)
def test_selection_time_range(seen: object, accepted: bool) -> None:
    selection = Selection(since=at("2024-05-01T12:00:00Z"), until=at("2024-05-01T13:00:00Z"))
    assert selection.accepts({"last_seen": seen}) is accepted


def test_selection_receipt_id() -> None:
    selection = Selection(receipt_id=7)
    assert selection.accepts({"receipt_id": 7})
    assert not selection.accepts({"receipt_id": 8})
    assert not selection.accepts({"receipt_id": "7"})
    assert not selection.accepts({})
    assert Selection().accepts({})


# --- page ------------------------------------------------------------------------------


def test_page_is_newest_first_with_a_cursor(store: DeadLetterStore) -> None:
    for _ in range(7):
        add(store)
    first = store.page(Selection(), limit=3)
    assert ids(first) == ["dl-7", "dl-6", "dl-5"]
    assert (first.next_before, first.partial) == (5, False)
    second = store.page(Selection(), before=first.next_before, limit=3)
    assert ids(second) == ["dl-4", "dl-3", "dl-2"]
    last = store.page(Selection(), before=second.next_before, limit=3)
    assert ids(last) == ["dl-1"]
    assert last.next_before is None
    assert store.page(Selection(), before=1, limit=3) == Page([], None, False, 0)


def test_page_entries_are_heads(store: DeadLetterStore) -> None:
    add(store, payload="x" * MAX_PAYLOAD_BYTES)
    [head] = store.page(Selection(), limit=5).entries
    assert not HEAD_ONLY & set(head)
    assert head["id"] == "dl-1"
    assert (head["reason"], head["brand"], head["receipt_id"]) == ("unknown_brand", "acme", 7)
    assert head["error"] == "unknown_brand happened"


def test_page_keeps_its_cursor_when_entries_go(store: DeadLetterStore) -> None:
    for _ in range(6):
        add(store)
    first = store.page(Selection(), limit=3)
    store.remove("dl-7")  # nothing: no such entry
    store.remove("dl-6")
    store.remove("dl-3")
    second = store.page(Selection(), before=first.next_before, limit=3)
    assert ids(second) == ["dl-2", "dl-1"]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(reason="auth_failed"), ["dl-5", "dl-3", "dl-1"]),
        (Selection(brand="b"), ["dl-5", "dl-4"]),
        (Selection(brand=""), ["dl-6"]),
        (Selection(reason="auth_failed", brand="b"), ["dl-5"]),
        (Selection(reason="auth_failed", brand=""), []),
        (Selection(receipt_id=2), ["dl-4", "dl-2"]),
        (Selection(reason="auth_failed", receipt_id=2), []),
        (Selection(brand="a", receipt_id=1), ["dl-1"]),
        (Selection(brand="no such"), []),  # not a brand: no key is built from it
        (Selection(brand="x:y"), []),
        (Selection(reason="validation_failed"), []),
    ],
)
def test_page_filters(store: DeadLetterStore, selection: Selection, expected: list[str]) -> None:
    add(store, "auth_failed", brand="a", receipt_id=1)  # dl-1
    add(store, "receipt_not_found", brand="a", receipt_id=2)  # dl-2
    add(store, "auth_failed", brand="a", receipt_id=3)  # dl-3
    add(store, "receipt_not_found", brand="b", receipt_id=2)  # dl-4
    add(store, "auth_failed", brand="b", receipt_id=5)  # dl-5
    store.add(reason="invalid_message", payload="not json", error="x")  # dl-6, no brand
    page = store.page(selection, limit=10)
    assert ids(page) == expected
    assert page.next_before is None and not page.partial


def test_page_of_nothing(store: DeadLetterStore) -> None:
    assert store.page(Selection(), limit=5) == Page([], None, False, 0)
    add(store)
    assert store.page(Selection(), limit=0) == Page([], None, False, 0)


def test_page_filtered_by_time(store: DeadLetterStore) -> None:
    for hour in (10, 11, 12, 13):
        add(store, last_seen=f"2024-05-01T{hour}:30:00Z")
    selection = Selection(since=at("2024-05-01T11:00:00Z"), until=at("2024-05-01T13:00:00Z"))
    assert ids(store.page(selection, limit=10)) == ["dl-3", "dl-2"]


def test_a_filtered_page_stops_at_the_scan_limit_and_goes_on(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "SCAN_LIMIT", 12)
    monkeypatch.setattr(dlq, "HEAD_CHUNK", 4)
    add(store, receipt_id=99)  # dl-1
    add(store, receipt_id=99)  # dl-2
    for _ in range(20):
        add(store, receipt_id=1)  # dl-3 .. dl-22
    selection = Selection(receipt_id=99)
    first = store.page(selection, limit=5)
    assert first.entries == []
    assert first.partial
    assert first.scanned == 12  # three chunks of 4: at the limit after the third
    assert first.next_before == 11
    second = store.page(selection, before=first.next_before, limit=5)
    assert ids(second) == ["dl-2", "dl-1"]
    assert not second.partial and second.next_before is None
    assert second.scanned == 10


def test_a_partial_page_keeps_what_it_found(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "SCAN_LIMIT", 6)
    monkeypatch.setattr(dlq, "HEAD_CHUNK", 3)
    for n in range(12):
        add(store, receipt_id=99 if n in (1, 10) else 1)  # dl-2 and dl-11 match
    page = store.page(Selection(receipt_id=99), limit=5)
    assert ids(page) == ["dl-11"]
    assert page.partial and page.next_before == 7


def test_a_full_page_stops_at_its_last_entry(store: DeadLetterStore) -> None:
    for n in range(10):
        add(store, receipt_id=5 if n % 2 else 6)
    page = store.page(Selection(receipt_id=5), limit=2)
    assert ids(page) == ["dl-10", "dl-8"]
    assert page.next_before == 8 and not page.partial
    assert ids(store.page(Selection(receipt_id=5), before=8, limit=10)) == ["dl-6", "dl-4", "dl-2"]


@pytest.mark.parametrize("selection", [Selection(), Selection(receipt_id=7)])
def test_the_last_full_page_says_there_is_no_more(
    store: DeadLetterStore, selection: Selection
) -> None:
    for _ in range(4):
        add(store)
    second = store.page(selection, before=3, limit=2)
    assert ids(second) == ["dl-2", "dl-1"]
    assert second.next_before is None


# --- selected_ids, count_selected, newest_seq ------------------------------------------


@pytest.fixture
def mixed(store: DeadLetterStore) -> DeadLetterStore:
    add(store, "auth_failed", brand="a", receipt_id=1)  # dl-1
    add(store, "receipt_not_found", brand="b", receipt_id=2)  # dl-2
    add(store, "auth_failed", brand="b", receipt_id=2)  # dl-3
    store.add(reason="invalid_message", payload="x", error="x")  # dl-4
    add(store, "auth_failed", brand="b", receipt_id=2)  # dl-5
    return store


@pytest.mark.parametrize(
    ("selection", "upto", "expected"),
    [
        (Selection(), 5, ["dl-1", "dl-2", "dl-3", "dl-4", "dl-5"]),
        (Selection(), 3, ["dl-1", "dl-2", "dl-3"]),
        (Selection(), 0, []),
        (Selection(reason="auth_failed"), 5, ["dl-1", "dl-3", "dl-5"]),
        (Selection(reason="auth_failed"), 4, ["dl-1", "dl-3"]),
        (Selection(brand="b"), 5, ["dl-2", "dl-3", "dl-5"]),
        (Selection(brand=""), 5, ["dl-4"]),
        (Selection(reason="auth_failed", brand="b"), 5, ["dl-3", "dl-5"]),
        (Selection(reason="auth_failed", brand="b"), 4, ["dl-3"]),
        (Selection(receipt_id=2), 5, ["dl-2", "dl-3", "dl-5"]),
        (Selection(receipt_id=2), 2, ["dl-2"]),
        (Selection(reason="auth_failed", receipt_id=2), 5, ["dl-3", "dl-5"]),
        (Selection(brand="a b"), 5, []),
    ],
)
def test_selected_ids_and_their_count(
    mixed: DeadLetterStore, selection: Selection, upto: int, expected: list[str]
) -> None:
    assert list(mixed.selected_ids(selection, upto=upto)) == expected  # oldest first
    assert mixed.count_selected(selection, upto=upto) == len(expected)


def test_selected_ids_leave_entries_added_later(store: DeadLetterStore) -> None:
    for _ in range(3):
        add(store)
    upto = store.newest_seq()
    add(store)
    assert list(store.selected_ids(Selection(reason="unknown_brand"), upto=upto)) == [
        "dl-1",
        "dl-2",
        "dl-3",
    ]
    assert store.count_selected(Selection(), upto=upto) == 3


def test_selected_ids_can_be_removed_while_walking(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "PAGE", 3)
    monkeypatch.setattr(dlq, "HEAD_CHUNK", 2)
    for _ in range(10):
        add(store)
    removed = store.remove_many(store.selected_ids(Selection(receipt_id=7), upto=8))
    assert removed == [f"dl-{n}" for n in range(1, 9)]
    assert [e["id"] for e in store.list()] == ["dl-10", "dl-9"]


def test_newest_seq(store: DeadLetterStore) -> None:
    assert store.newest_seq() == 0
    add(store)
    add(store)
    assert store.newest_seq() == 2
    store.remove("dl-2")
    assert store.newest_seq() == 1
    store.remove("dl-1")
    assert store.newest_seq() == 0


# --- replay_many, remove_many ----------------------------------------------------------


def test_replay_many_replays_and_refuses(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    add(store, receipt_id=1)  # dl-1
    store.add(reason="invalid_message", payload="x" * (MAX_PAYLOAD_BYTES + 1), error="big")
    store.add(reason="invalid_message", payload=b"\xff\xfe not utf-8", error="bytes")
    store.add(reason="invalid_message", payload='{"receipt_id": 0}', error="bad")
    add(store, receipt_id=5)  # dl-5
    replayed, refused = store.replay_many(
        ["dl-1", "dl-2", "dl-3", "dl-4", "dl-5", "dl-99", "bogus"], stream=STREAM
    )
    assert [item["id"] for item in replayed] == ["dl-1", "dl-5"]
    stream = redis.xrange(STREAM)
    assert [item["stream_id"] for item in replayed] == [stream_id for stream_id, _ in stream]
    assert [fields["replay_of"] for _, fields in stream] == ["dl-1", "dl-5"]
    assert [item["id"] for item in refused] == ["dl-2", "dl-3", "dl-4"]
    assert "payload was truncated (1048577 bytes); cannot replay" in refused[0]["error"]
    assert "payload was not valid UTF-8; cannot replay" in refused[1]["error"]
    assert "payload is still invalid" in refused[2]["error"]
    assert [e["id"] for e in store.list()] == ["dl-4", "dl-3", "dl-2"]
    assert store.stats()["total"] == 3


def test_replay_many_accepts_a_lazy_selection(store: DeadLetterStore) -> None:
    for _ in range(3):
        add(store)
    outcome = store.replay_many(store.selected_ids(Selection(), upto=2), stream=STREAM)
    assert [item["id"] for item in outcome.replayed] == ["dl-1", "dl-2"]
    assert outcome.refused == []


def test_remove_many(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    for brand in ("a", "b", "a"):
        add(store, brand=brand)
    removed = store.remove_many(["dl-1", "dl-3", "dl-3", "dl-9", "dl-x", "fw:dlq:seq", "dl-0"])
    assert removed == ["dl-1", "dl-3"]
    assert [e["id"] for e in store.list()] == ["dl-2"]
    stats = store.stats()
    assert (stats["total"], stats["by_brand"]) == (1, {"b": 1})
    assert stats["bytes"] == redis.strlen(keys.dlq_entry("dl-2"))
    assert redis.get(keys.DLQ_SEQ) == "3"
    assert store.remove_many([]) == []


# --- heads ---------------------------------------------------------------------------


def test_heads_in_order_without_payload(store: DeadLetterStore) -> None:
    add(store, receipt_id=1, result={"receipt_id": 1, "brand": "acme", "fiscal_id": "F"})
    add(store, receipt_id=2, payload="y" * (MAX_PAYLOAD_BYTES + 5))
    heads = store.heads(["dl-2", "dl-9", "dl-1"])
    assert [h and h["id"] for h in heads] == ["dl-2", None, "dl-1"]
    for head, entry_id in ((heads[0], "dl-2"), (heads[2], "dl-1")):
        assert head is not None
        entry = store.get(entry_id)
        assert entry is not None
        assert head == {k: v for k, v in entry.items() if k not in HEAD_ONLY}
    assert store.heads([]) == []


def test_heads_of_hostile_fields(store: DeadLetterStore) -> None:
    """`,"payload":` in a field before the payload is escaped JSON: not taken for it."""
    store.add(
        reason="invalid_message",
        payload="the payload",
        error='x,"payload":"fake"} and more',
        brand='b,"payload":1',
        fiscal_id="\u2028\x00\"'",
    )
    [head] = store.heads(["dl-1"])
    assert head is not None
    assert head["error"] == 'x,"payload":"fake"} and more'
    assert head["brand"] == 'b,"payload":1'
    assert head["fiscal_id"] == "\u2028\x00\"'"


def test_heads_of_an_entry_whose_head_is_past_head_bytes(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    """An entry written with every character escaped (a lone surrogate) has a longer head:
    read whole."""
    error = "\U0001f600" * 1999 + "\ud800"  # 12 bytes a character escaped
    store.add(reason="invalid_message", payload="p", error=error)
    assert redis.strlen(keys.dlq_entry("dl-1")) > HEAD_BYTES
    [head] = store.heads(["dl-1"])
    assert head is not None
    assert head["error"] == error
    assert "payload" not in head


def test_heads_of_an_older_layout(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    """No `,"payload":` marker (the payload first): the entry is read whole."""
    entry = {"payload": "p", "id": "dl-5", "reason": "auth_failed", "receipt_id": 3}
    redis.set(keys.dlq_entry("dl-5"), json.dumps(entry))
    assert store.heads(["dl-5"]) == [{"id": "dl-5", "reason": "auth_failed", "receipt_id": 3}]


def test_heads_of_damaged_and_older_entries_keep_their_places(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    redis.set(keys.dlq_entry("dl-1"), "not json")
    redis.set(keys.dlq_entry("dl-2"), json.dumps({"payload": "p", "id": "dl-2"}))
    assert store.heads(["dl-1", "dl-2"]) == [None, {"id": "dl-2"}]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", None),
        ('{"id":"dl-1","error":"e","payload":"x"}', {"id": "dl-1", "error": "e"}),
        (b'{"id":"dl-1","error":"\xc3\xa9","payload":"\xff', {"id": "dl-1", "error": "é"}),
        ('{"id":"dl-1","error":"e"}', {"id": "dl-1", "error": "e"}),  # no marker: read whole
        (
            '{"id":"dl-1","error":"x,\\"payload\\":1","payload":2}',
            {"id": "dl-1", "error": 'x,"payload":1'},
        ),
        ('{"id":"dl-1","err', None),
        ('[1,"payload":2]', None),
        ('{"id":"dl-1","error":"e,"payload":"x"}', None),  # damaged: not JSON before it
    ],
)
def test_heads_of_raw_entries(
    store: DeadLetterStore, redis: fakeredis.FakeRedis, raw: str | bytes,
    expected: dict[str, object] | None,
) -> None:  # fmt: skip
    redis.set(keys.dlq_entry("dl-1"), raw)
    assert store.heads(["dl-1"]) == [expected]


@pytest.mark.parametrize("shift", range(4))
def test_heads_are_cut_on_the_server_never_inside_a_character(
    store: DeadLetterStore, shift: int
) -> None:
    """A head is the entry up to its payload, whatever multi-byte text the payload holds
    where HEAD_BYTES ends (a client that decodes replies would choke on a split character)."""
    entry = {"id": "dl-1", "error": "é", "payload": "x" * shift + "€" * 10_000}
    text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    store.redis.set(keys.dlq_entry("dl-1"), text)
    assert store.heads(["dl-1"]) == [{"id": "dl-1", "error": "é"}]


# --- trend -----------------------------------------------------------------------------


def test_trend_counts_this_hour(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    assert store.trend(24) == [0] * 24
    for _ in range(3):
        add(store)
    trend = store.trend(24)
    assert len(trend) == 24
    assert trend[-1] == 3 and sum(trend) == 3
    hour = int(time.time() // 3600)
    assert redis.hget(keys.DLQ_HOURLY, str(hour)) == "3"
    store.remove("dl-1")  # the trend counts what was added, not what is left
    assert store.trend(24)[-1] == 3


def test_trend_hours_are_oldest_first(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    now = 1_000 * 3600 + 5.0
    redis.hset(keys.DLQ_HOURLY, mapping={"1000": 4, "999": 2, "997": 1, "990": 9, "1001": 7})
    assert store.trend(4, now=now) == [1, 0, 2, 4]
    assert store.trend(1, now=now) == [4]
    assert store.trend(2, now=now + 3600) == [4, 7]


def test_trend_reads_damaged_counts_as_zero(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    redis.hset(keys.DLQ_HOURLY, mapping={"1000": "lots", "999": "-3", "998": "2"})
    assert store.trend(3, now=1000 * 3600) == [2, 0, 0]


def test_the_hourly_counts_are_bounded(store: DeadLetterStore, redis: fakeredis.FakeRedis) -> None:
    hour = int(time.time() // 3600)
    old = {str(hour - 100 - n): 1 for n in range(60)}
    recent = {str(hour - n): 1 for n in range(1, 40)}
    redis.hset(keys.DLQ_HOURLY, mapping={**old, **recent})
    add(store)
    fields = {int(f) for f in redis.hkeys(keys.DLQ_HOURLY)}
    assert min(fields) >= hour - 48
    assert set(recent) | {str(hour)} == {str(f) for f in fields}


# --- the operator log ------------------------------------------------------------------


def test_record_and_read_back(redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture) -> None:
    oplog = OperatorLog(redis)
    caplog.set_level(logging.INFO, logger="worker.oplog")
    stream_id = oplog.record(
        who="alice",
        via="web",
        action="replay",
        selection={"filter": {"reason": "auth_failed"}},
        count=3,
        refused=1,
        ids=["dl-1", "dl-2", "dl-3"],
    )
    [entry] = oplog.recent()
    assert entry["id"] == stream_id
    assert entry["at"].endswith("Z")
    assert abs(at(entry["at"]).timestamp() - time.time()) < 60
    assert entry == {
        "id": stream_id,
        "at": entry["at"],
        "who": "alice",
        "via": "web",
        "action": "replay",
        "selection": {"filter": {"reason": "auth_failed"}},
        "count": 3,
        "refused": 1,
        "ids": ["dl-1", "dl-2", "dl-3"],
    }
    [line] = [r.getMessage() for r in caplog.records if "operator_action" in r.getMessage()]
    assert "who=alice" in line and "via=web" in line and "count=3" in line


def test_recent_is_newest_first_and_limited(redis: fakeredis.FakeRedis) -> None:
    oplog = OperatorLog(redis)
    for count in range(5):
        oplog.record(who="bob", via="cli", action="purge", selection={"all": True}, count=count)
    assert [e["count"] for e in oplog.recent()] == [4, 3, 2, 1, 0]
    assert [e["count"] for e in oplog.recent(2)] == [4, 3]
    assert [e["count"] for e in oplog.recent(0)] == [4]
    assert OperatorLog(fakeredis.FakeRedis(decode_responses=True)).recent() == []


@pytest.mark.parametrize(
    ("action", "via", "message"),
    [("delete", "web", "unknown operator action"), ("purge", "api", "unknown operator log source")],
)
def test_record_refuses_unknown_actions_and_sources(
    redis: fakeredis.FakeRedis, action: str, via: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorLog(redis).record(who="x", via=via, action=action, selection={}, count=1)
    assert redis.xlen(keys.OPLOG) == 0


def test_record_bounds_who_and_ids(redis: fakeredis.FakeRedis) -> None:
    oplog = OperatorLog(redis)
    oplog.record(
        who="\x1b[2J" + "m" * 100,
        via="cli",
        action="purge",
        selection={"id": "dl-\u202e"},
        count=30,
        ids=[f"dl-{n}" for n in range(30)],
    )
    oplog.record(who="", via="cli", action="purge", selection={}, count=0)
    blank, entry = oplog.recent()
    assert entry["who"] == "?[2J" + "m" * (MAX_WHO_CHARS - 4)
    assert entry["ids"] == [f"dl-{n}" for n in range(IDS_KEPT)]
    assert entry["count"] == 30
    assert entry["selection"] == {"id": "dl-\u202e"}
    assert "\u202e" not in redis.xrange(keys.OPLOG)[0][1]["selection"]  # stored as ASCII
    assert blank["who"] == "?"
    assert blank["ids"] == []


def test_recent_reads_damaged_entries(redis: fakeredis.FakeRedis) -> None:
    redis.xadd(keys.OPLOG, {"selection": "{not json", "count": "many"})
    redis.xadd(keys.OPLOG, {"selection": "[1, 2]", "who": "eve"})
    listed, unlisted = OperatorLog(redis).recent()
    assert listed["selection"] == {} and listed["who"] == "eve"
    assert unlisted["selection"] == {} and unlisted["count"] == 0
    assert unlisted["who"] is None and unlisted["ids"] == []


def test_the_log_is_trimmed(redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "OPLOG_MAXLEN", 10)
    oplog = OperatorLog(redis)
    for count in range(300):
        oplog.record(who="x", via="cli", action="purge", selection={}, count=count)
    assert redis.xlen(keys.OPLOG) <= 10 + 100  # approximate: Redis trims whole nodes
    assert oplog.recent(1)[0]["count"] == 299


# --- `dlq log`, and the CLI's replay / purge writing it --------------------------------


@pytest.fixture
def os_user(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(dlq_commands.getpass, "getuser", lambda: "carol")
    return "carol"


def cli_log() -> list[dict[str, object]]:
    result = run("dlq", "log", "--json")
    assert result.exit_code == 0, result.stderr
    entries: list[dict[str, object]] = json.loads(result.stdout)
    return entries


def test_dlq_log_empty(redis: fakeredis.FakeRedis) -> None:
    result = run("dlq", "log")
    assert result.exit_code == 0
    assert result.stdout == "no operator actions logged\n"
    assert cli_log() == []


def test_dlq_log_lists_both_sources(redis: fakeredis.FakeRedis) -> None:
    oplog = OperatorLog(redis)
    oplog.record(who="alice", via="web", action="replay", selection={"ids": 2}, count=2)
    oplog.record(who="bob\x1b[31m", via="cli", action="purge", selection={"all": True}, count=7)
    result = run("dlq", "log")
    assert result.exit_code == 0, result.stderr
    header, newest, older = result.stdout.splitlines()
    for column in ("at", "who", "via", "action", "selection", "count", "refused"):
        assert column in header
    assert "bob?[31m" in newest and "cli" in newest and "purge" in newest
    assert '{"all": true}' in newest and " 7 " in newest
    assert "alice" in older and "web" in older and '{"ids": 2}' in older
    assert "\x1b" not in result.stdout
    entries = cli_log()
    assert [(e["who"], e["via"], e["action"]) for e in entries] == [
        ("bob?[31m", "cli", "purge"),
        ("alice", "web", "replay"),
    ]


def test_dlq_log_limit(redis: fakeredis.FakeRedis) -> None:
    oplog = OperatorLog(redis)
    for count in range(5):
        oplog.record(who="x", via="cli", action="purge", selection={}, count=count)
    result = run("dlq", "log", "--json", "--limit", "2")
    assert [e["count"] for e in json.loads(result.stdout)] == [4, 3]
    assert run("dlq", "log", "--limit", "0").exit_code == 2
    assert run("dlq", "log", "--limit", "10001").exit_code == 2


def test_cli_replay_one_is_logged(store: DeadLetterStore, os_user: str) -> None:
    add(store)
    assert run("dlq", "replay", "dl-1").exit_code == 0
    [entry] = cli_log()
    assert (entry["who"], entry["via"], entry["action"]) == ("carol", "cli", "replay")
    assert (entry["selection"], entry["count"], entry["refused"]) == ({"id": "dl-1"}, 1, 0)
    assert entry["ids"] == ["dl-1"]


def test_cli_bulk_replay_is_logged_with_its_refusals(store: DeadLetterStore, os_user: str) -> None:
    add(store, "auth_failed")
    store.add(reason="auth_failed", payload="not json", error="x")
    add(store, "auth_failed", brand="other")
    add(store, "receipt_not_found")
    assert run("dlq", "replay", "--reason", "auth_failed", "--brand", "acme").exit_code == 0
    assert run("dlq", "replay", "--all").exit_code == 0
    newest, first = cli_log()
    assert first["selection"] == {"reason": "auth_failed", "brand": "acme"}
    assert (first["count"], first["refused"], first["ids"]) == (1, 0, ["dl-1"])
    assert newest["selection"] == {"all": True}
    assert (newest["count"], newest["refused"], newest["ids"]) == (2, 1, ["dl-3", "dl-4"])


def test_a_refused_single_replay_is_logged(store: DeadLetterStore, os_user: str) -> None:
    store.add(reason="invalid_message", payload="not json", error="x")
    assert run("dlq", "replay", "dl-1").exit_code == 1
    [entry] = cli_log()
    assert (entry["count"], entry["refused"], entry["ids"]) == (0, 1, [])


def test_cli_purges_are_logged(
    store: DeadLetterStore, os_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for brand in ("a", "b", "b", "c"):
        add(store, brand=brand)
    assert run("dlq", "purge", "dl-1").exit_code == 0
    assert run("dlq", "purge", "--brand", "b", "--yes").exit_code == 0
    assert run("dlq", "purge", "--all", "--yes").exit_code == 0
    newest, brand, one = cli_log()
    assert (one["action"], one["via"], one["who"]) == ("purge", "cli", "carol")
    assert (one["selection"], one["count"]) == ({"id": "dl-1"}, 1)
    assert (brand["selection"], brand["count"]) == ({"brand": "b"}, 2)
    assert (newest["selection"], newest["count"]) == ({"all": True}, 1)


def test_a_purge_that_does_not_happen_is_not_logged(
    store: DeadLetterStore, os_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(store)
    assert run("dlq", "purge", "--all").exit_code == 1  # no terminal, no --yes
    monkeypatch.setattr(dlq_commands, "_stdin_is_interactive", lambda: True)
    assert run("dlq", "purge", "--all", input="n\n").exit_code == 1
    assert run("dlq", "purge", "dl-9").exit_code == 1  # no such entry
    assert run("dlq", "replay", "dl-9").exit_code == 1
    assert cli_log() == []
    assert store.count() == 1


def test_the_os_user_without_a_name(
    store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nameless() -> str:
        raise KeyError("getpwuid(): uid not found: 4242")

    monkeypatch.setattr(dlq_commands.getpass, "getuser", nameless)
    add(store)
    assert run("dlq", "purge", "dl-1").exit_code == 0
    [entry] = cli_log()
    assert entry["who"] == f"uid {os.getuid()}"


def test_entries_written_by_the_pipeline_are_read_by_page(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    """An add inside the caller's MULTI/EXEC (as the pipeline does) is paged and trended."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        add(store, rid="1-0", pipeline=pipe)
        add(store, rid="2-0", pipeline=pipe, last_seen=datetime(2024, 5, 1, tzinfo=UTC))
        pipe.execute()
    assert ids(store.page(Selection(), limit=5)) == ["dl-2", "dl-1"]
    assert store.trend(1) == [2]
    assert store.newest_seq() == 2


def test_an_entry_committed_after_the_fence_is_not_selected(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    """An id is allocated before its transaction commits: an entry whose id is older but
    which commits after a confirmation (its `upto`) is not touched by the confirmed action."""
    with redis.pipeline(transaction=True) as late:
        late.multi()
        late_id = store.add(reason="auth_failed", payload="{}", error="late", pipeline=late)
        early_id = store.add(reason="auth_failed", payload="{}", error="early")
        upto = store.newest_seq()
        late.execute()
    assert int(late_id[3:]) < int(early_id[3:])  # the late one has the older id
    assert list(store.selected_ids(Selection(), upto=upto)) == [early_id]
    assert store.count_selected(Selection(reason="auth_failed"), upto=upto) == 1
    assert store.newest_seq() > upto
    assert [e["id"] for e in store.page(Selection()).entries] == [late_id, early_id]


def test_a_damaged_order_counter_goes_on_from_the_highest_score(
    store: DeadLetterStore, redis: fakeredis.FakeRedis
) -> None:
    """A damaged commit-order counter blocks no add, and a new entry still scores above
    every entry there (a confirmed `upto` fence stays below it); the counter is repaired."""
    first = store.add(reason="auth_failed", payload="{}", error="x")
    redis.zadd(keys.DLQ_INDEX, {first: 50})  # given a high place in commit order earlier
    fence = 50
    redis.set(keys.DLQ_ORDER, "not a number")
    second = store.add(reason="auth_failed", payload="{}", error="y")
    assert redis.zscore(keys.DLQ_INDEX, second) == 51
    assert redis.get(keys.DLQ_ORDER) == "51"
    assert list(store.selected_ids(Selection(), upto=fence)) == [first]
