"""The outcome table (docs/interface.md) end to end: a real redis-server, real `celery worker`
processes, the fake Clopos API over HTTP. One test per row of the table and per failure
class."""

from __future__ import annotations

import json
import threading

import pytest
from support import closed, dlq_entries, patches, wait_finished, wait_for, xadd

from worker import audit_events, keys

B = "openapitest"


def result(receipt_id: int, fiscal_id: str = "F-1", brand: str = B, **extra):
    return {"receipt_id": receipt_id, "brand": brand, "fiscal_id": fiscal_id, **extra}


def calls(fake, receipt_id: int, brand: str = B) -> dict:
    return fake.stats()["receipts"].get(f"{brand}:{receipt_id}", {"get": 0, "patch": 0})


def only_dlq(r, reason: str) -> dict:
    entries = dlq_entries(r)
    assert [e["reason"] for e in entries] == [reason], entries
    return entries[0]


# --- the outcome table of docs/interface.md ---------------------------------------------
def test_closed_without_fiscal_id_gets_both_fields(r, fake, start_worker):
    fake.add_receipt(B, closed(1))
    start_worker()
    xadd(r, result(1, "F-A"))
    wait_finished(r)
    assert patches(fake, B, 1) == [{"fiscal_id": "F-A", "lock": True}]
    assert r.hmget(keys.receipt(B, 1), "s", "f") == ["f", "F-A"]  # its marker
    assert dlq_entries(r) == []


def test_already_fiscalised_and_locked_sends_nothing(r, fake, start_worker):
    fake.add_receipt(B, closed(2, fiscal_id="F-B", lock=True))
    start_worker()
    xadd(r, result(2, "F-B"))
    wait_finished(r)
    assert calls(fake, 2)["get"] == 1
    assert patches(fake, B, 2) == []
    assert int(r.hget(keys.COUNTERS, "already_done")) == 1


def test_same_fiscal_id_unlocked_gets_lock_only(r, fake, start_worker):
    fake.add_receipt(B, closed(3, fiscal_id="F-C", lock=False))
    start_worker()
    xadd(r, result(3, "F-C"))
    wait_finished(r)
    assert patches(fake, B, 3) == [{"lock": True}]
    assert fake.receipt(B, 3)["lock"] is True


def test_different_fiscal_id_is_never_overwritten(r, fake, start_worker):
    fake.add_receipt(B, closed(4, fiscal_id="THEIRS", lock=True))
    start_worker()
    xadd(r, result(4, "OURS"))
    wait_finished(r)
    entry = only_dlq(r, "fiscal_id_conflict")
    assert patches(fake, B, 4) == []
    assert fake.receipt(B, 4)["fiscal_id"] == "THEIRS"
    assert entry["fiscal_id"] == "OURS" and "THEIRS" in entry["error"]


def test_open_receipt_is_retried_until_it_closes(r, fake, start_worker):
    fake.add_receipt(B, closed(5))
    fake.close_after(B, 5, 2.0)
    start_worker()
    xadd(r, result(5))
    wait_finished(r, timeout=20)
    assert calls(fake, 5)["get"] >= 2
    assert patches(fake, B, 5) == [{"fiscal_id": "F-1", "lock": True}]


def test_receipt_never_closed_is_dead_lettered_after_the_window(r, fake, start_worker):
    fake.add_receipt(B, {"id": 6, "status": 1, "closed_at": None})
    start_worker(FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="3")
    xadd(r, result(6))
    wait_finished(r, timeout=20)
    entry = only_dlq(r, "receipt_not_closed")
    assert entry["attempts"] >= 2
    assert patches(fake, B, 6) == []


def test_missing_receipt_appearing_later_is_fiscalised(r, fake, start_worker):
    fake.add_receipt(B, closed(7))
    fake.appear_after(B, 7, 2.0)
    start_worker()
    xadd(r, result(7))
    wait_finished(r, timeout=20)
    assert patches(fake, B, 7) == [{"fiscal_id": "F-1", "lock": True}]


def test_missing_receipt_is_dead_lettered_after_the_window(r, fake, start_worker):
    start_worker(FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="3")
    xadd(r, result(8))
    wait_finished(r, timeout=20)
    entry = only_dlq(r, "receipt_not_found")
    assert entry["http_status"] == 404
    assert entry["attempts"] >= 2


# --- other failures ------------------------------------------------------------------------------
def test_unknown_brand_is_dead_lettered_at_once_without_api_calls(r, fake, start_worker):
    start_worker()
    xadd(r, result(9, brand="nobody-knows"))
    wait_finished(r)
    entry = only_dlq(r, "unknown_brand")
    assert entry["brand"] == "nobody-knows"
    assert fake.stats()["auth_calls"] == {}


def test_patch_400_is_validation_failed_at_once(r, fake, start_worker):
    fake.add_receipt(B, closed(10))
    fake.fail_next(B, 10, 400, count=5, method="PATCH")
    start_worker()
    xadd(r, result(10))
    wait_finished(r)
    entry = only_dlq(r, "validation_failed")
    assert entry["http_status"] == 400
    assert calls(fake, 10)["patch"] == 1  # not retried


def test_200_success_false_validation_failed_is_permanent(r, fake, start_worker):
    fake.add_receipt(B, closed(11))
    fake.success_false(B, 11, "validation_failed", count=5, method="PATCH")
    start_worker()
    xadd(r, result(11))
    wait_finished(r)
    only_dlq(r, "validation_failed")


def test_200_success_false_not_found_is_not_ready_and_retried(r, fake, start_worker):
    fake.add_receipt(B, closed(12))
    fake.success_false(B, 12, "not_found", count=2, method="GET")
    start_worker()
    xadd(r, result(12))
    wait_finished(r, timeout=20)
    assert patches(fake, B, 12) == [{"fiscal_id": "F-1", "lock": True}]
    assert calls(fake, 12)["get"] == 3


def test_rejected_credentials_are_auth_failed_after_bounded_retries(r, fake, start_worker):
    fake.add_receipt(B, closed(13))
    fake.reject_auth(B)
    start_worker()
    xadd(r, result(13))
    wait_finished(r, timeout=120)  # 5 tries, each after the 10 s memory of the rejection
    entry = only_dlq(r, "auth_failed")
    assert entry["attempts"] >= 1
    auth_calls = fake.stats()["auth_calls"].get(B, 0)  # every /v2/auth, rejected ones too
    assert 1 <= auth_calls <= 5  # bounded: one per try at most, never a storm


def test_401_on_a_call_reauthenticates_once_and_succeeds(r, fake, start_worker):
    fake.add_receipt(B, closed(14))
    fake.add_receipt(B, closed(15))
    start_worker()
    xadd(r, result(14, "F-14"))
    wait_finished(r)
    fake.revoke_tokens(B)
    xadd(r, result(15, "F-15"))
    wait_finished(r)
    assert patches(fake, B, 15) == [{"fiscal_id": "F-15", "lock": True}]
    assert fake.stats()["auth_calls"][B] == 2
    assert dlq_entries(r) == []


def test_429_waits_and_is_not_a_failed_attempt(r, fake, start_worker):
    fake.rate_limit, fake.rate_window = 3, 2.0  # 4 results need 8 calls: some get a 429
    receipts = (16, 161, 162, 163)
    for rid in receipts:
        fake.add_receipt(B, closed(rid))
    start_worker(
        concurrency=4,
        FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="1",
        FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS="1",
    )
    for rid in receipts:
        xadd(r, result(rid))
    wait_finished(r, timeout=40)
    # 429s would exhaust a 1 s transient window if they counted as failures: they do not.
    assert fake.stats()["rate_limited"].get(B, 0) >= 1
    for rid in receipts:
        assert patches(fake, B, rid) == [{"fiscal_id": "F-1", "lock": True}]
    assert dlq_entries(r) == []


def test_5xx_is_retried_with_backoff_and_then_succeeds(r, fake, start_worker):
    fake.add_receipt(B, closed(17))
    fake.fail_next(B, 17, 503, count=2, method="ANY")
    start_worker()
    xadd(r, result(17))
    wait_finished(r, timeout=20)
    assert patches(fake, B, 17) == [{"fiscal_id": "F-1", "lock": True}]


def test_persistent_5xx_is_retries_exhausted_after_the_window(r, fake, start_worker):
    fake.add_receipt(B, closed(18))
    fake.fail_next(B, 18, 500, count=1000, method="ANY")
    start_worker(FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS="3")
    xadd(r, result(18))
    wait_finished(r, timeout=20)
    entry = only_dlq(r, "retries_exhausted")
    assert entry["http_status"] == 500
    assert entry["attempts"] >= 2


def test_patch_timeout_is_retried_and_the_get_check_prevents_a_second_patch(r, fake, start_worker):
    fake.add_receipt(B, closed(19))
    fake.set_latency(4.0, brand=B, receipt_id=19, method="PATCH")  # > the 3 s client timeout
    start_worker()
    xadd(r, result(19))
    # The slow PATCH lands in the fake although the worker gave up on it; the retry's GET sees it.
    wait_for(lambda: calls(fake, 19)["get"] >= 2, timeout=20)
    fake.set_latency(0.0, brand=B, receipt_id=19, method="PATCH")
    wait_finished(r, timeout=20)
    assert fake.receipt(B, 19)["fiscal_id"] == "F-1"
    assert len(patches(fake, B, 19)) == 1
    assert dlq_entries(r) == []


def test_venue_id_is_sent_as_x_venue(r, fake, start_worker):
    fake.add_receipt(B, closed(20, venue_id=2))
    start_worker()
    xadd(r, result(20, venue_id=2))
    wait_finished(r)
    assert fake.receipt(B, 20)["fiscal_id"] == "F-1"


# --- duplicates ----------------------------------------------------------------------------------
def test_same_result_three_times_in_a_row_is_one_patch(r, fake, start_worker):
    fake.add_receipt(B, closed(21))
    start_worker()
    for _ in range(3):
        xadd(r, result(21, "F-21", device_id="printer-1"))
        wait_finished(r)
    assert patches(fake, B, 21) == [{"fiscal_id": "F-21", "lock": True}]
    assert int(r.hget(keys.COUNTERS, "duplicate")) == 2
    assert calls(fake, 21)["get"] == 1  # the marker absorbed the duplicates without a call


def test_same_result_three_times_concurrently_never_two_patches(r, fake, start_worker):
    fake.add_receipt(B, closed(22))
    fake.set_latency(0.5, brand=B, receipt_id=22)
    start_worker("w1", concurrency=3)
    start_worker("w2", concurrency=3)
    threads = [threading.Thread(target=xadd, args=(r, result(22, "F-22"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_finished(r, timeout=30)
    stats = fake.stats()
    assert patches(fake, B, 22) == [{"fiscal_id": "F-22", "lock": True}]
    assert stats["receipts"][f"{B}:22"]["max_concurrent_patches"] == 1


def test_duplicate_with_a_different_fiscal_id_is_a_conflict(r, fake, start_worker):
    fake.add_receipt(B, closed(23))
    start_worker()
    xadd(r, result(23, "FIRST"))
    wait_finished(r)
    xadd(r, result(23, "SECOND"))
    wait_finished(r)
    entry = only_dlq(r, "fiscal_id_conflict")
    assert entry["fiscal_id"] == "SECOND"
    assert fake.receipt(B, 23)["fiscal_id"] == "FIRST"
    assert len(patches(fake, B, 23)) == 1


@pytest.mark.parametrize("marker_lost", [True])
def test_after_the_marker_expires_the_get_check_still_prevents_a_patch(
    r, fake, start_worker, marker_lost
):
    fake.add_receipt(B, closed(24))
    start_worker()
    xadd(r, result(24, "F-24"))
    wait_finished(r)
    r.delete(keys.receipt(B, 24))  # as if its record had expired
    xadd(r, result(24, "F-24"))
    wait_finished(r)
    assert len(patches(fake, B, 24)) == 1
    assert calls(fake, 24)["get"] == 2


# --- the audit events ---------------------------------------------------------------------


def test_each_finished_result_is_one_audit_event_in_the_log_and_the_file(
    r, fake, start_worker, tmp_path
):
    """Real worker processes (prefork: the events come from the pool's children) tell each
    finished result once, in their log and in the events file, the same event in both."""
    for n in (1, 2):
        fake.add_receipt(B, closed(n))
    events_file = tmp_path / "audit-{date}.jsonl"
    worker = start_worker(FISCAL_AUDIT_EVENTS_FILE=str(events_file))
    sent = [xadd(r, result(1, "F-1")), xadd(r, result(2, "F-2", device_id="p2"))]
    wait_finished(r)
    sent.append(xadd(r, result(2, "F-2")))  # a duplicate, absorbed by the marker
    sent.append(xadd(r, {"receipt_id": "x"}))  # invalid: dead-lettered at ingest
    wait_finished(r)
    logged = [e for e in map(audit_events.parse, worker.log().splitlines()) if e is not None]
    assert sorted(e["rid"] for e in logged) == sorted(sent)
    by_rid = {e["rid"]: e for e in logged}
    assert [by_rid[rid]["outcome"] for rid in sent] == [
        "fiscalised", "fiscalised", "duplicate", "dead_lettered",
    ]  # fmt: skip
    assert by_rid[sent[1]]["device_id"] == "p2"
    assert by_rid[sent[3]]["reason"] == "invalid_message"
    [day_file] = tmp_path.glob("audit-*.jsonl")
    in_file = [json.loads(line) for line in day_file.read_text().splitlines()]
    assert sorted(in_file, key=lambda e: e["rid"]) == sorted(logged, key=lambda e: e["rid"])
