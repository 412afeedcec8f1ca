"""Recovery: dead-letter replay after the cause is fixed, a worker killed mid-task, and
results whose task message is lost are re-driven from their record in Redis."""

from __future__ import annotations

import json
import time

from support import closed, dlq_entries, patches, run_cli, wait_finished, wait_for, xadd

from worker import keys

B = "openapitest"


def test_dlq_replay_after_the_cause_is_fixed(r, fake, start_worker, env):
    start_worker(FISCAL_NOT_READY_RETRY_WINDOW_SECONDS="2")
    xadd(r, {"receipt_id": 31, "brand": B, "fiscal_id": "F-31", "device_id": "printer-3"})
    wait_finished(r, timeout=20)
    [entry] = dlq_entries(r)
    assert entry["reason"] == "receipt_not_found"

    fake.add_receipt(B, closed(31))  # the receipt finally synced
    replay = run_cli(env, "dlq", "replay", entry["id"])
    assert replay.returncode == 0, replay.stderr
    wait_for(lambda: fake.receipt(B, 31)["fiscal_id"] == "F-31", timeout=20)
    wait_finished(r)
    assert dlq_entries(r) == []
    assert patches(fake, B, 31) == [{"fiscal_id": "F-31", "lock": True}]
    record = json.loads(run_cli(env, "receipt", B, "31", "--json").stdout)
    assert record["state"] == "fiscalised" and record["fiscal_id"] == "F-31"


def test_replay_of_an_already_fiscalised_result_patches_nothing(r, fake, start_worker, env):
    fake.add_receipt(B, closed(32))
    start_worker()
    xadd(r, {"receipt_id": 32, "brand": B, "fiscal_id": "F-32"})
    wait_finished(r)
    xadd(r, {"receipt_id": 32, "brand": B, "fiscal_id": "OTHER"})
    wait_finished(r)
    [entry] = dlq_entries(r)
    assert entry["reason"] == "fiscal_id_conflict"
    assert run_cli(env, "dlq", "replay", "--all").returncode == 0
    wait_for(
        lambda: len(dlq_entries(r)) == 1 and dlq_entries(r)[0]["id"] != entry["id"], timeout=20
    )
    assert dlq_entries(r)[0]["reason"] == "fiscal_id_conflict"  # still never overwritten
    assert patches(fake, B, 32) == [{"fiscal_id": "F-32", "lock": True}]


def test_worker_killed_mid_task_the_result_is_fiscalised_once_by_another(r, fake, start_worker):
    fake.add_receipt(B, closed(33))
    fake.set_latency(2.5, brand=B, receipt_id=33, method="GET")
    w1 = start_worker("w1")
    xadd(r, {"receipt_id": 33, "brand": B, "fiscal_id": "F-33"})
    # Kill the whole worker (main process and pool) while its GET is in flight.
    wait_for(
        lambda: "receipt_id=33" in w1.log() and "event=token_refreshed" in w1.log(), timeout=20
    )
    w1.kill()
    fake.set_latency(0.0, brand=B, receipt_id=33, method="GET")
    start_worker("w2")
    # Re-driven from the result's lease (5 s here, 60 s by default), not the broker's timeout.
    wait_finished(r, timeout=40)
    assert patches(fake, B, 33) == [{"fiscal_id": "F-33", "lock": True}]
    assert dlq_entries(r) == []


def test_worker_killed_mid_patch_never_patches_twice(r, fake, start_worker):
    fake.add_receipt(B, closed(34))
    fake.set_latency(2.0, brand=B, receipt_id=34, method="PATCH")
    w1 = start_worker("w1")
    xadd(r, {"receipt_id": 34, "brand": B, "fiscal_id": "F-34"})
    wait_for(lambda: fake.stats()["receipts"].get(f"{B}:34", {}).get("patch", 0) == 1, timeout=20)
    w1.kill()
    start_worker("w2")
    wait_finished(r, timeout=40)
    # The PATCH in flight landed; the re-driven run's GET sees it and sends nothing.
    assert patches(fake, B, 34) == [{"fiscal_id": "F-34", "lock": True}]
    assert fake.receipt(B, 34)["fiscal_id"] == "F-34"


def test_lost_task_message_is_re_driven_from_the_schedule(r, fake, start_worker):
    fake.add_receipt(B, closed(35))
    w1 = start_worker("w1")
    w1.stop()
    # A result recorded and leased as queued, whose message never reached the broker.
    now = float(r.time()[0])
    record = {
        "result": json.dumps({"receipt_id": 35, "brand": B, "fiscal_id": "F-35"}),
        "payload": "{}",
        "brand": B,
        "receipt_id": "35",
        "first_seen": repr(now),
        "dispatch": "1",
    }
    r.hset(keys.result("lost-1"), mapping=record)
    r.zadd(keys.SCHEDULE, {"lost-1": now + 3})
    start_worker("w2")
    wait_finished(r, timeout=30)
    assert patches(fake, B, 35) == [{"fiscal_id": "F-35", "lock": True}]


def test_stream_entry_of_a_dead_consumer_is_claimed_by_a_live_one(r, fake, start_worker):
    fake.add_receipt(B, closed(36))
    w1 = start_worker("w1")
    w1.stop()
    # A consumer read the entry and died before settling it.
    xadd(r, {"receipt_id": 36, "brand": B, "fiscal_id": "F-36"})
    r.xreadgroup(keys.INGEST_GROUP, "dead-consumer", {"fiscal:results": ">"}, count=10)
    assert r.xpending("fiscal:results", keys.INGEST_GROUP)["pending"] == 1
    start_worker("w2")  # claims entries idle for 2 s here (30 s by default)
    wait_finished(r, timeout=30)
    assert patches(fake, B, 36) == [{"fiscal_id": "F-36", "lock": True}]
    assert r.xpending("fiscal:results", keys.INGEST_GROUP)["pending"] == 0


def test_results_a_killed_worker_held_are_re_driven_after_its_lease_not_the_queue_lease(
    r, fake, start_worker
):
    # Only the worker's heartbeat lease (4 s) can bring these back soon: the queue lease of a
    # published message is 300 s, as long as a message may sit in a long queue.
    leases = {
        "FISCAL_QUEUE_LEASE_SECONDS": "300",
        "FISCAL_RUN_LEASE_SECONDS": "4",
        "FISCAL_WORKER_LEASE_SECONDS": "4",
        "FISCAL_WORKER_HEARTBEAT_SECONDS": "1",
    }
    receipts = range(41, 47)
    for receipt_id in receipts:
        fake.add_receipt(B, closed(receipt_id))
    fake.set_latency(3.0, brand=B, method="GET")
    w1 = start_worker("w1", concurrency=2, **leases)
    for receipt_id in receipts:
        xadd(r, {"receipt_id": receipt_id, "brand": B, "fiscal_id": f"F-{receipt_id}"})
    wait_for(lambda: r.hlen("unacked") >= 2, timeout=20, what="w1 holds messages")
    held = r.hlen("unacked")
    w1.kill()
    killed = time.monotonic()
    fake.set_latency(0.0, brand=B, method="GET")
    start_worker("w2", concurrency=2, **leases)
    wait_finished(r, timeout=60)
    recovery = time.monotonic() - killed
    print(f"\nheld by the killed worker: {held}; all fiscalised {recovery:.1f} s after the kill")
    assert recovery < 30
    for receipt_id in receipts:
        assert patches(fake, B, receipt_id) == [{"fiscal_id": f"F-{receipt_id}", "lock": True}]
