"""The receipt record on a real redis-server: Redis keeps it in its compact encoding (a
listpack) through the attempts a troubled receipt collects, not only on the happy path.
(fakeredis has no encodings; bench/footprint.py measures the bytes.)"""

from __future__ import annotations

from worker import keys
from worker.audit import AuditTrail

B = "openapitest"


def test_a_receipt_with_every_attempt_kept_stays_a_listpack(r):
    trail = AuditTrail(r, ttl_seconds=600, max_attempts=20)
    trail.record_received(
        B, 123456, fiscal_id="FISCAL-0001234567", device_id="printer-17",
        result_id="1733212345678-0", printed_at="2026-12-03T12:00:00.123Z",
    )  # fmt: skip
    outcomes = ["not found", "not closed yet", "transient", "rate limited", "closed"]
    for n in range(30):  # past the ring of 20
        status = (404, 200, 503, 429, 200)[n % 5]
        trail.record_attempt(B, 123456, call="GET", http_status=status, outcome=outcomes[n % 5])
    trail.record_attempt(B, 123456, call="PATCH", http_status=200, outcome="fiscalised")
    trail.set_state(B, 123456, "fiscalised", fiscal_id="FISCAL-0001234567")
    key = keys.receipt(B, 123456)
    assert r.object("encoding", key) == "listpack"
    assert len(trail.get(B, 123456)["attempts"]) == 20  # type: ignore[index]
    assert r.memory_usage(key, samples=0) < 1400  # 20 attempts; the happy path is ~200 B


def test_a_happy_receipt_is_small(r):
    trail = AuditTrail(r, ttl_seconds=600, max_attempts=20)
    trail.record_received(B, 7, fiscal_id="F-7", result_id="1733212345678-0")
    trail.record_attempt(B, 7, call="GET", http_status=200, outcome="closed")
    trail.record_attempt(B, 7, call="PATCH", http_status=200, outcome="fiscalised")
    trail.set_state(B, 7, "fiscalised", fiscal_id="F-7")
    assert r.object("encoding", keys.receipt(B, 7)) == "listpack"
    assert r.memory_usage(keys.receipt(B, 7), samples=0) <= 400
