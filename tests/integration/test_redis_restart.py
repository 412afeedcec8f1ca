"""Redis going away mid-run (celery-pitfalls #3): no result lost, none applied twice."""

from __future__ import annotations

import signal

from support import closed, dlq_entries, patches, wait_finished, wait_for, xadd

B = "openapitest"


def test_redis_killed_and_restarted_mid_run_loses_and_doubles_nothing(
    r, redis_server, fake, start_worker
):
    receipts = range(1, 61)
    for rid in receipts:
        fake.add_receipt(B, closed(rid))
    fake.set_latency(0.05)
    start_worker("w1", concurrency=4)
    for rid in range(1, 31):
        xadd(r, {"receipt_id": rid, "brand": B, "fiscal_id": f"F-{rid}"})
    wait_for(lambda: sum(1 for i in receipts if fake.receipt(B, i)["lock"]) >= 8, timeout=30)

    redis_server.stop(signal.SIGKILL)  # AOF with fsync on every write: nothing acknowledged is lost
    redis_server.start()
    r = redis_server.client()
    for rid in range(31, 61):
        xadd(r, {"receipt_id": rid, "brand": B, "fiscal_id": f"F-{rid}"})

    wait_finished(r, timeout=120)
    for rid in receipts:
        assert patches(fake, B, rid) == [{"fiscal_id": f"F-{rid}", "lock": True}], rid
    assert dlq_entries(r) == []
    assert fake.stats()["max_concurrent_patches"] <= 1
