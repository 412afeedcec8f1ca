"""One rate budget per brand across every worker process, fair between brands, listening to
the server, and a circuit breaker per brand: real workers, the fake API over HTTP."""

from __future__ import annotations

import json
import time

from support import closed, dlq_entries, run_cli, wait_finished, wait_for, xadd

from worker import keys

A, C = "openapitest", "brand2"
SMALL_BUDGET = {"FISCAL_RATE_LIMIT_REQUESTS": "20", "FISCAL_RATE_LIMIT_WINDOW_SECONDS": "5"}


def fiscalised(fake, brand: str, receipt_ids) -> int:
    return sum(1 for rid in receipt_ids if (fake.receipt(brand, rid) or {}).get("lock"))


def max_calls_in_window(fake, brand: str, window: float) -> int:
    times = sorted(
        t for t, _m, b, _r, status in fake.stats()["request_log"] if b == brand and status != 429
    )
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_budget_is_shared_by_all_workers_and_spent_fully(r, fake, start_worker):
    fake.rate_limit, fake.rate_window = 20, 5.0
    receipts = range(1, 41)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    for name in ("w1", "w2", "w3"):
        start_worker(name, concurrency=4, **SMALL_BUDGET)
    started = time.monotonic()
    for rid in receipts:
        xadd(r, {"receipt_id": rid, "brand": A, "fiscal_id": f"F-{rid}"})
    wait_for(lambda: fiscalised(fake, A, receipts) == 40, timeout=60, what="40 fiscalised")
    drain = time.monotonic() - started
    ideal = 40 * 2 / (20 / 5)  # 20 s
    stats = fake.stats()
    print(f"drain {drain:.1f}s ideal {ideal:.0f}s 429s {stats['rate_limited'].get(A, 0)}")
    assert stats["rate_limited"].get(A, 0) <= 1
    assert drain <= ideal * 1.15
    wait_finished(r)
    assert dlq_entries(r) == []


def test_server_pressure_slows_the_fleet_instead_of_collecting_429s(r, fake, start_worker):
    fake.rate_limit, fake.rate_window = 20, 5.0
    fake.set_external_usage(A, 10)  # another client of the same brand uses half the budget
    receipts = range(1, 21)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    start_worker("w1", concurrency=4, **SMALL_BUDGET)
    start_worker("w2", concurrency=4, **SMALL_BUDGET)
    for rid in receipts:
        xadd(r, {"receipt_id": rid, "brand": A, "fiscal_id": f"F-{rid}"})
    wait_for(lambda: fiscalised(fake, A, receipts) == 20, timeout=90, what="20 fiscalised")
    stats = fake.stats()
    others = r.get(keys.rate_others(A))
    print(f"429s {stats['rate_limited'].get(A, 0)} others-estimate {others}")
    # Before the first answer the fleet cannot know; after it, it keeps to the other half.
    assert stats["rate_limited"].get(A, 0) <= 3
    assert max_calls_in_window(fake, A, 5.0) <= 11
    wait_finished(r)
    assert dlq_entries(r) == []


def test_one_brands_backlog_does_not_delay_another_brand(r, fake, start_worker):
    for rid in range(1, 201):
        fake.add_receipt(A, closed(rid))
    for rid in range(1, 4):
        fake.add_receipt(C, closed(rid))
    start_worker("w1", concurrency=4)
    start_worker("w2", concurrency=4)
    for rid in range(1, 201):
        xadd(r, {"receipt_id": rid, "brand": A, "fiscal_id": f"A-{rid}"})
    wait_for(lambda: fiscalised(fake, A, range(1, 201)) >= 5, timeout=30, what="A draining")
    sent = time.monotonic()
    for rid in range(1, 4):
        xadd(r, {"receipt_id": rid, "brand": C, "fiscal_id": f"C-{rid}"})
    wait_for(lambda: fiscalised(fake, C, range(1, 4)) == 3, timeout=30, what="C's three")
    delay = time.monotonic() - sent
    a_done = fiscalised(fake, A, range(1, 201))
    print(f"brand C fiscalised {delay:.2f}s after it was sent; brand A at {a_done}/200")
    assert delay <= 5.0
    assert a_done < 200  # A was still draining at its full budget


def test_breaker_pauses_a_failing_brand_and_its_results_land_after(r, fake, start_worker, env):
    receipts = range(1, 11)
    for rid in receipts:
        fake.add_receipt(C, closed(rid))
    fake.fail_brand(C, 500, duration=20)
    start_worker(
        "w1",
        concurrency=4,
        FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS="300",
        FISCAL_BREAKER_MAX_COOLDOWN_SECONDS="10",
    )
    for rid in receipts:
        xadd(r, {"receipt_id": rid, "brand": C, "fiscal_id": f"C-{rid}"})
    wait_for(lambda: r.hget(keys.breaker(C), "state") == "open", timeout=15, what="circuit open")
    # Visible to operators: the stats command and the metrics.
    stats = json.loads(run_cli(env, "stats", "--json").stdout)
    assert stats["brands"][C]["breaker"]["state"] in ("open", "half_open")
    assert stats["brands"][A]["breaker"]["state"] == "closed"
    assert f'fiscal_brand_circuit_open{{brand="{C}"}} 1.0' in run_cli(env, "metrics").stdout
    wait_for(lambda: fiscalised(fake, C, receipts) == 10, timeout=90, what="C recovered")
    failed = fake.stats()["failed"].get(C, 0)
    print(f"failed calls to {C} during a 20 s outage: {failed}")
    # Without the breaker these 10 results retry about once a second each: ~200 failed calls.
    assert failed <= 25
    wait_finished(r)
    assert dlq_entries(r) == []
    assert int(r.hget(keys.COUNTERS, "circuit_opened") or 0) >= 1
    assert int(r.hget(keys.COUNTERS, "circuit_closed") or 0) >= 1
