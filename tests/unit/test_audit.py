"""The per-receipt audit trail, on fakeredis."""

from __future__ import annotations

from datetime import UTC, datetime

import fakeredis
import pytest

from worker import keys
from worker.audit import AuditTrail

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
    assert 0 < redis.ttl(keys.audit("acme", 7)) <= TTL


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
    assert redis.llen(keys.audit_attempts("acme", 7)) == 3
    assert 0 < redis.ttl(keys.audit_attempts("acme", 7)) <= TTL
    assert 0 < redis.ttl(keys.audit("acme", 7)) <= TTL


def test_every_write_renews_the_ttl(trail: AuditTrail, redis: fakeredis.FakeRedis) -> None:
    trail.record_received("acme", 7, fiscal_id="F-7")
    trail.record_attempt("acme", 7, call="GET", http_status=404, outcome="not found")
    redis.expire(keys.audit("acme", 7), 5)
    redis.expire(keys.audit_attempts("acme", 7), 5)
    trail.record_attempt("acme", 7, call="GET", http_status=200, outcome="closed")
    assert redis.ttl(keys.audit("acme", 7)) > 5
    assert redis.ttl(keys.audit_attempts("acme", 7)) > 5
    redis.expire(keys.audit("acme", 7), 5)
    redis.expire(keys.audit_attempts("acme", 7), 5)
    trail.set_state("acme", 7, "fiscalised", fiscal_id="F-7")
    assert redis.ttl(keys.audit("acme", 7)) > 5
    assert redis.ttl(keys.audit_attempts("acme", 7)) > 5


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
