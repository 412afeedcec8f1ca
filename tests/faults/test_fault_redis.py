"""Redis going away: restarted mid-run, unreachable (SIGSTOP) for 10 s, and full (maxmemory
with noeviction, pushed there by hostile large entries)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from faults.harness import (
    alive,
    fiscalised_count,
    two_workers_on_a_slow_api,
    until,
    wide_budget,
)
from support import closed, wait_for

from worker import keys

A = "openapitest"
MIB = 1024 * 1024


def patched_after(fake, brand: str, receipts, moment: float) -> bool:
    stats = fake.stats()["receipts"]
    return any(
        t > moment
        for rid in receipts
        for t in stats.get(f"{brand}:{rid}", {}).get("patched_at", [])
    )


def test_fault_03_redis_restarted_mid_run(r, redis_server, fake, start_worker, ledger):
    receipts = range(1, 81)
    w1, w2 = two_workers_on_a_slow_api(fake, start_worker, A, receipts, latency=0.2)
    for rid in range(1, 51):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: fiscalised_count(fake, A, receipts) >= 10, timeout=30, what="10 landed")
    in_flight = 50 - fiscalised_count(fake, A, receipts)

    restarted = time.time()
    redis_server.restart()  # SIGTERM (AOF, fsync always), then the same port again
    ledger.figure("redis_restart_s", time.time() - restarted)
    ledger.figure("unfinished_at_restart", in_flight)
    for rid in range(51, 81):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: patched_after(fake, A, receipts, restarted + 0.5), timeout=60)
    ledger.figure("first_patch_after_restart_s", time.time() - restarted)

    settled = ledger.settle(timeout=120)
    ledger.check(settled)
    assert alive(w1) and alive(w2)


def test_fault_04_redis_unreachable_for_10s(r, redis_server, fake, start_worker, ledger):
    receipts = range(1, 141)
    w1, w2 = two_workers_on_a_slow_api(fake, start_worker, A, receipts, latency=0.3)
    for rid in range(1, 121):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: fiscalised_count(fake, A, receipts) >= 8, timeout=30, what="8 landed")
    ledger.figure("unfinished_at_stop", 120 - fiscalised_count(fake, A, receipts))

    assert redis_server.process is not None
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # connections stay open, nothing answers: the worst kind
    try:
        until(time.monotonic() + 10)
        alive_during = alive(w1) and alive(w2)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.time()
    for rid in range(121, 141):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: patched_after(fake, A, receipts, resumed), timeout=60, what="a PATCH")
    ledger.figure("first_patch_after_resume_s", time.time() - resumed)

    settled = ledger.settle(timeout=120)
    ledger.check(settled)
    logs = w1.log() + w2.log()
    ledger.figure("redis_unavailable_logs", logs.count("event=redis_unavailable"))
    ledger.figure("task_redis_errors", logs.count("event=task_redis_error"))
    assert alive_during and alive(w1) and alive(w2), "a worker died while Redis was away"
    assert "Unrecoverable error" not in logs


def test_fault_11_redis_full_under_noeviction(r, fake, start_worker, ledger):
    receipts = range(1, 61)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    fake.set_latency(0.5, method="GET")
    fake.set_latency(0.5, method="PATCH")
    wide = wide_budget(fake)
    worker = start_worker("w1", concurrency=4, **wide)
    for rid in range(1, 21):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: fiscalised_count(fake, A, receipts) >= 2, timeout=30, what="2 landed")

    # A burst of hostile entries of 700 KiB (over the 64 KiB limit; the dead-letter store
    # keeps them whole) with valid results between them; Redis' limit is what they pushed
    # it to, so it is full while the worker still has entries to settle and results to run.
    r.config_set("maxmemory-policy", "noeviction")
    baseline = int(r.info("memory")["used_memory"])
    pipe = r.pipeline(transaction=False)
    burst: list[tuple[str, dict]] = []
    for n in range(24):
        fields = {"data": b"{" + b"%04d" % n + b"x" * (700 * 1024)}
        pipe.xadd("fiscal:results", fields)
        burst.append(("raw", fields))
        if n % 3 == 2:
            rid = 21 + n // 3
            data = f'{{"receipt_id": {rid}, "brand": "{A}", "fiscal_id": "F-{rid}"}}'
            pipe.xadd("fiscal:results", {"data": data})
            burst.append(("result", {"rid": rid}))
    entry_ids = pipe.execute()
    # ~16.8 MiB of hostile payloads stay in Redis (stream or dead-letter store) whatever the
    # worker has settled: a limit 8 MiB above the baseline is one they pushed Redis past.
    r.config_set("maxmemory", baseline + 8 * MIB)
    for entry_id, (kind, fields) in zip(entry_ids, burst, strict=True):
        if kind == "raw":
            ledger.add_raw(str(entry_id), fields, "invalid_message")
        else:
            ledger.add_result(str(entry_id), A, fields["rid"], f"F-{fields['rid']}")
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # adapters' writes fail now
        r.xadd("fiscal:results", {"data": '{"receipt_id": 60, "brand": "x", "fiscal_id": "F"}'})
    ledger.figure("limit_mib", int(r.config_get("maxmemory")["maxmemory"]) / MIB)
    ledger.figure("stream_at_limit", r.xlen("fiscal:results"))
    ledger.figure("unfinished_at_limit", r.zcard(keys.SCHEDULE))

    until(time.monotonic() + 20)  # at the limit: the worker can write nothing
    survived = alive(worker)
    ledger.figure("worker_survived_limit", survived)
    r.config_set("maxmemory", 0)  # the operator frees memory
    freed = time.time()
    if not survived:  # as its pod would be restarted: the books show what else went wrong
        worker = start_worker("w2", concurrency=4, **wide)
    for rid in range(41, 61):
        ledger.send(r, A, rid, f"F-{rid}")  # the adapter's writes go through again
    wait_for(lambda: patched_after(fake, A, receipts, freed), timeout=60, what="a PATCH")
    ledger.figure("first_patch_after_free_s", time.time() - freed)

    settled = ledger.settle(timeout=120)
    ledger.check(settled)
    # Known gap, reported by the `worker_survived_limit` figure: kombu acknowledges a task in
    # a MULTI, which Redis refuses at maxmemory, and Celery's consumer exits ("Unrecoverable
    # error: OutOfMemoryError"); its supervisor restarts it, as here, and nothing is lost.
    assert alive(worker)
