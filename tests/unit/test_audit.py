"""The per-receipt audit trail, on fakeredis."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import fakeredis
import pytest

from worker import keys
from worker.audit import AuditTrail, fold_legacy
from worker.idempotency import ReceiptLock

TTL = 3600


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def trail(redis: fakeredis.FakeRedis) -> AuditTrail:
    return AuditTrail(redis, ttl_seconds=TTL, max_attempts=3)


def test_unknown_receipt_has_no_record(trail: AuditTrail) -> None:
    assert trail.get("acme", 1) is None


def test_received_result_is_pending(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    trail.record_received(
        "acme",
        7,
        fiscal_id="F-7",
        device_id="printer-7",
        result_id="r-1",
        venue_id=2,
        printed_at="2024-05-01T12:00:00Z",
        extras={"table": 4},
    )
    record = trail.get("acme", 7)
    assert record is not None
    assert record["brand"] == "acme" and record["receipt_id"] == 7
    assert record["state"] == "pending"
    assert record["fiscal_id"] == "F-7"
    assert record["device_id"] == "printer-7"
    assert record["result_id"] == "r-1"
    assert record["venue_id"] == 2
    assert record["printed_at"] == "2024-05-01T12:00:00Z"
    assert record["extras"] == {"table": 4}
    assert record["updated_at"].endswith("Z")
    assert record["dlq_id"] is None
    assert record["attempts"] == []
    assert 0 < redis.ttl(keys.receipt("acme", 7)) <= TTL
    assert redis.keys("*") == [keys.receipt("acme", 7)]  # one key per receipt


def test_attempts_are_recorded_and_capped(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    trail.record_received("acme", 7, fiscal_id="F-7")
    for status in (500, 502, 503, 200, 200):
        trail.record_attempt(
            "acme",
            7,
            call="GET",
            http_status=status,
            outcome=f"status {status}",
            at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        )
    trail.record_attempt("acme", 7, call="PATCH", http_status=None, outcome="timeout")
    record = trail.get("acme", 7)
    assert record is not None
    assert [(a["call"], a["http_status"], a["outcome"]) for a in record["attempts"]] == [
        ("GET", 200, "status 200"),
        ("GET", 200, "status 200"),
        ("PATCH", None, "timeout"),
    ]
    assert record["attempts"][0]["at"] == "2024-05-01T12:00:00.000Z"
    fields = redis.hgetall(keys.receipt("acme", 7))
    assert fields["n"] == "6"  # every attempt counted; the last 3 kept, in a ring of 3
    assert sorted(k for k in fields if k.startswith("a")) == ["a0", "a1", "a2"]
    assert 0 < redis.ttl(keys.receipt("acme", 7)) <= TTL


def test_every_write_renews_the_ttl(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    trail.record_received("acme", 7, fiscal_id="F-7")
    trail.record_attempt("acme", 7, call="GET", http_status=404, outcome="not found")
    redis.expire(keys.receipt("acme", 7), 5)
    trail.record_attempt("acme", 7, call="GET", http_status=200, outcome="closed")
    assert redis.ttl(keys.receipt("acme", 7)) > 5
    redis.expire(keys.receipt("acme", 7), 5)
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    assert redis.ttl(keys.receipt("acme", 7)) > 5


def test_fiscalised_is_not_downgraded_by_a_new_result(trail: AuditTrail) -> None:
    trail.record_received("acme", 7, fiscal_id="F-7", device_id="p1")
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    trail.record_received("acme", 7, fiscal_id="OTHER", device_id="p2")
    record = trail.get("acme", 7)
    assert record is not None
    assert record["state"] == "fiscalised"
    assert record["fiscal_id"] == "F-7"  # the one the receipt carries
    assert record["device_id"] == "p1"


def test_fiscalised_keeps_its_state_when_a_later_result_is_dead_lettered(
    trail: AuditTrail,
) -> None:
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    trail.set_state("acme", 7, "dead_lettered", fiscal_id="OTHER", dlq_id="dl-3")
    record = trail.get("acme", 7)
    assert record is not None
    assert (record["state"], record["fiscal_id"], record["dlq_id"]) == ("fiscalised", "F-7", "dl-3")
    trail.set_state("acme", 7, "pending", force=True)
    assert trail.get("acme", 7)["state"] == "pending"  # type: ignore[index]


def test_dead_lettered_goes_back_to_pending_on_a_new_result(trail: AuditTrail) -> None:
    trail.record_received("acme", 7, fiscal_id="F-7")
    trail.set_state("acme", 7, "dead_lettered", dlq_id="dl-1")
    assert trail.get("acme", 7)["state"] == "dead_lettered"  # type: ignore[index]
    trail.record_received("acme", 7, fiscal_id="F-8")
    record = trail.get("acme", 7)
    assert record is not None
    assert (record["state"], record["fiscal_id"]) == ("pending", "F-8")


def test_writes_join_a_callers_transaction(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    with redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        trail.record_received("acme", 7, fiscal_id="F-7", pipeline=pipe)
        trail.record_attempt(
            "acme", 7, call="PATCH", http_status=200, outcome="fiscalised", pipeline=pipe
        )
        trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7", pipeline=pipe)
        assert trail.get("acme", 7) is None  # nothing before EXEC
        pipe.execute()
    record = trail.get("acme", 7)
    assert record is not None
    assert record["state"] == "fiscalised"
    assert len(record["attempts"]) == 1


def test_bad_input_builds_no_key(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValueError, match="brand"):
        trail.record_received("a:b", 7, fiscal_id="F")
    with pytest.raises(ValueError, match="receipt_id"):
        trail.record_attempt("acme", 0, call="GET", http_status=200, outcome="x")
    with pytest.raises(ValueError, match="receipt_id"):
        trail.get("acme", True)
    with pytest.raises(ValueError, match="unknown state"):
        trail.set_state("acme", 7, "done")
    assert redis.keys("*") == []


def test_attempt_without_a_received_record_is_still_shown(trail: AuditTrail) -> None:
    trail.record_attempt("acme", 7, call="auth", http_status=401, outcome="rejected")
    record = trail.get("acme", 7)
    assert record is not None
    assert record["state"] is None
    assert record["attempts"][0]["call"] == "auth"


# --- the one-key record: its lifetimes, its size, the legacy layout -------------------


def test_a_fiscalised_record_lives_the_markers_lifetime_if_longer(
    redis: fakeredis.FakeRedis,
) -> None:
    trail = AuditTrail(redis, ttl_seconds=TTL, max_attempts=3, fiscalised_ttl_seconds=10 * TTL)
    trail.record_received("acme", 7, fiscal_id="F-7")
    assert redis.ttl(keys.receipt("acme", 7)) <= TTL
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    assert redis.ttl(keys.receipt("acme", 7)) > TTL
    trail.record_attempt("acme", 7, call="GET", http_status=200, outcome="x")
    trail.record_received("acme", 7, fiscal_id="F-7")  # a duplicate: stays fiscalised
    assert redis.ttl(keys.receipt("acme", 7)) > TTL
    trail.record_received("acme", 8, fiscal_id="F-8")
    trail.set_state("acme", 8, "dead_lettered", dlq_id="dl-1")
    assert redis.ttl(keys.receipt("acme", 8)) <= TTL


def test_a_fiscalised_record_stays_in_the_compact_encoding(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    """The happy path's record: short names and values, so Redis keeps it as a listpack
    (bench/footprint.py measures its bytes on a real redis-server)."""
    trail.record_received(
        "acme", 123456, fiscal_id="FISCAL-0001234567", device_id="printer-17",
        result_id="1733212345678-0", printed_at="2026-12-03T12:00:00.123Z",
    )  # fmt: skip
    trail.record_attempt("acme", 123456, call="GET", http_status=200, outcome="ok")
    trail.record_attempt("acme", 123456, call="PATCH", http_status=200, outcome="ok")
    trail.set_state("acme", 123456, "fiscalised", fiscal_id="FISCAL-0001234567")
    fields = redis.hgetall(keys.receipt("acme", 123456))
    assert set(fields) == {"s", "f", "d", "r", "t", "u", "n", "a0", "a1"}
    assert all(len(value) <= 64 for value in fields.values())  # hash-max-listpack-value


def test_an_attempts_outcome_is_kept_on_one_line(trail: AuditTrail) -> None:
    trail.record_attempt(
        "acme", 7, call="GET receipt", http_status=True, outcome="line one\nline  two"
    )
    [attempt] = trail.get("acme", 7)["attempts"]  # type: ignore[index]
    assert attempt["call"] == "GET_receipt"
    assert attempt["http_status"] is None
    assert attempt["outcome"] == "line one line two"


def seed_legacy(redis: fakeredis.FakeRedis, *, marker: bool = True) -> None:
    """A receipt as the layout before wrote it: hash, JSON attempts, marker."""
    redis.hset(
        keys.legacy_audit("acme", 7),
        mapping={
            "state": "fiscalised", "fiscal_id": "F-7", "device_id": "p1", "result_id": "1-0",
            "venue_id": "3", "extras": '{"table": 4}', "updated_at": "2026-01-01T00:00:00.000Z",
            "brand": "acme", "receipt_id": "7",
        },
    )  # fmt: skip
    redis.rpush(
        keys.legacy_audit_attempts("acme", 7),
        json.dumps({"at": "2026-01-01T00:00:00.000Z", "call": "GET", "http_status": 200,
                    "outcome": "closed"}),
        json.dumps({"at": "2026-01-01T00:00:01.000Z", "call": "PATCH", "http_status": 200,
                    "outcome": "fiscalised"}),
    )  # fmt: skip
    if marker:
        redis.set(keys.legacy_fiscalised("acme", 7), "F-7")
    for key in (keys.legacy_audit("acme", 7), keys.legacy_audit_attempts("acme", 7)):
        redis.expire(key, 50 * TTL)
    if marker:
        redis.expire(keys.legacy_fiscalised("acme", 7), 20 * TTL)


LEGACY_VIEW = {
    "brand": "acme", "receipt_id": 7, "state": "fiscalised", "fiscal_id": "F-7",
    "device_id": "p1", "result_id": "1-0", "venue_id": 3, "printed_at": None,
    "extras": {"table": 4}, "updated_at": "2026-01-01T00:00:00.000Z", "dlq_id": None,
    "attempts": [
        {"at": "2026-01-01T00:00:00.000Z", "call": "GET", "http_status": 200,
         "outcome": "closed"},
        {"at": "2026-01-01T00:00:01.000Z", "call": "PATCH", "http_status": 200,
         "outcome": "fiscalised"},
    ],
    "expires_in": None,
}  # fmt: skip


def test_a_legacy_record_is_read_as_before(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    seed_legacy(redis)
    assert trail.get("acme", 7) == LEGACY_VIEW
    assert trail.fiscal_id_of("acme", 7) == "F-7"


def test_a_legacy_marker_keeps_a_new_result_from_moving_the_receipt_off_fiscalised(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    seed_legacy(redis)
    trail.record_received("acme", 7, fiscal_id="OTHER", device_id="p2")
    trail.set_state("acme", 7, "dead_lettered", fiscal_id="OTHER", dlq_id="dl-9")
    record = trail.get("acme", 7)
    assert record is not None
    assert (record["state"], record["fiscal_id"], record["device_id"]) == (
        "fiscalised",
        "F-7",
        "p1",
    )
    assert record["dlq_id"] == "dl-9"
    assert trail.fiscal_id_of("acme", 7) == "F-7"
    assert [a["call"] for a in record["attempts"]] == ["GET", "PATCH"]


def test_folding_a_legacy_record_keeps_what_it_said_in_one_key(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    seed_legacy(redis)
    trail.record_attempt("acme", 7, call="GET", http_status=200, outcome="again")
    assert fold_legacy(redis, "acme", 7, max_attempts=3) is True
    assert redis.keys("*") == [keys.receipt("acme", 7)]
    record = trail.get("acme", 7)
    assert record is not None
    expected = {**LEGACY_VIEW, "attempts": [*LEGACY_VIEW["attempts"], record["attempts"][-1]]}
    assert {k: v for k, v in record.items() if k != "expires_in"} == {
        k: v for k, v in expected.items() if k != "expires_in"
    }
    assert record["attempts"][-1]["outcome"] == "again"
    assert redis.ttl(keys.receipt("acme", 7)) > 20 * TTL  # the longest lifetime of the keys
    assert fold_legacy(redis, "acme", 7, max_attempts=3) is False  # nothing left to fold


def test_folding_keeps_the_last_attempts_only(trail: AuditTrail, redis: fakeredis.FakeRedis):
    seed_legacy(redis, marker=False)
    fold_legacy(redis, "acme", 7, max_attempts=1)
    record = trail.get("acme", 7)
    assert record is not None
    assert [a["outcome"] for a in record["attempts"]] == ["fiscalised"]
    assert record["state"] == "fiscalised"


def test_a_legacy_marker_beside_a_pending_record_still_means_fiscalised(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    """A rolling upgrade: a new worker recorded the result (pending), an older one then
    fiscalised the receipt under its legacy marker. A duplicate is absorbed without a call,
    and nothing moves the receipt off fiscalised."""
    trail.record_received("acme", 7, fiscal_id="F-7")
    redis.set(keys.legacy_fiscalised("acme", 7), "F-7")
    assert ReceiptLock(redis, "acme", 7, "2-0", 1).take() == (False, "F-7")
    trail.set_state("acme", 7, "dead_lettered", fiscal_id="OTHER", dlq_id="dl-1")
    record = trail.get("acme", 7)
    assert record is not None
    assert (record["state"], record["fiscal_id"], record["dlq_id"]) == ("fiscalised", "F-7", "dl-1")
    assert redis.hget(keys.receipt("acme", 7), "s") == "f"


def test_a_fiscalised_record_keeps_its_fiscal_id_even_fiscalised_again(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    trail.set_state("acme", 7, "fiscalised", fiscal_id="OTHER")
    assert redis.hget(keys.receipt("acme", 7), "f") == "F-7"


@pytest.mark.parametrize(
    "damage",
    [
        {"u": "9" * 30},
        {"n": "2", "a0": "99999999999999999999 GET 200 ok", "a1": "x"},
        {"n": "1", "a0": "1700000000000 GET \u00b2 ok"},
        {"n": "1", "a0": "1700000000000 GET 9999999999 ok"},
        {"n": "many"},
        {"s": "?", "v": "seven", "x": "not json"},
    ],
)
def test_a_damaged_record_is_shown_not_a_crash(
    trail: AuditTrail, redis: fakeredis.FakeRedis, damage: dict[str, str]
) -> None:
    redis.hset(keys.receipt("acme", 7), mapping=damage)
    record = trail.get("acme", 7)
    assert record is not None
    assert all(a["http_status"] is None or a["http_status"] < 1000 for a in record["attempts"])


def test_folding_a_fiscalised_legacy_state_without_a_fiscal_id(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    redis.hset(keys.legacy_audit("acme", 7), "state", "fiscalised")
    redis.hset(keys.receipt("acme", 7), mapping={"s": "p", "f": "F-7"})
    assert fold_legacy(redis, "acme", 7, max_attempts=3) is True
    assert redis.hmget(keys.receipt("acme", 7), "s", "f") == ["f", "F-7"]


def test_folding_rewrites_the_attempts_ring_in_order(
    trail: AuditTrail, redis: fakeredis.FakeRedis
) -> None:
    seed_legacy(redis)
    for n in range(4):  # the ring of 3 has wrapped
        trail.record_attempt("acme", 7, call="GET", http_status=200, outcome=f"new {n}")
    fold_legacy(redis, "acme", 7, max_attempts=3)
    assert [a["outcome"] for a in trail.get("acme", 7)["attempts"]] == [  # type: ignore[index]
        "new 1", "new 2", "new 3",
    ]  # fmt: skip
    trail.record_attempt("acme", 7, call="GET", http_status=200, outcome="after")
    assert [a["outcome"] for a in trail.get("acme", 7)["attempts"]] == [  # type: ignore[index]
        "new 2", "new 3", "after",
    ]  # fmt: skip
