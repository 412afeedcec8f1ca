"""Workers dying: SIGKILL mid-flight (default leases: the recovery time), SIGTERM while busy
(the grace period pods need), and a consumer that read stream entries and never acked."""

from __future__ import annotations

import signal
import time

from faults.harness import (
    DEADLINE_VARIABLE,
    LEASE_VARIABLES,
    alive,
    fiscalised_count,
    held_by,
    lines_about,
    two_workers_on_a_slow_api,
    wide_budget,
)
from support import closed, wait_for

from worker import keys
from worker.store import QUEUE_LEASE_SECONDS

A = "openapitest"
RECOVERY_TIMEOUT_SECONDS = 60  # with default settings (measured ~125 s before heartbeat leases)


def landed(fake, ledger, keys_: set[str]) -> bool:
    return all(
        (fake.receipt(ledger.sent[k].brand, ledger.sent[k].receipt_id) or {}).get("fiscal_id")
        == ledger.sent[k].fiscal_id
        for k in keys_
    )


def unfinished_held(fake, ledger, worker) -> set[str]:
    """The results whose task the worker holds, not fiscalised yet."""
    held = {ledger.by_entry[rid] for rid in held_by(worker) if rid in ledger.by_entry}
    return {k for k in held if not landed(fake, ledger, {k})}


def two_busy_workers(r, fake, ledger, start_worker, *, results: int, latency: float):
    """Two workers on a slow fake and `results` results; once w1 holds several unfinished
    ones (and some have landed), returns w1 and what it holds."""
    receipts = range(1, results + 1)
    w1, _ = two_workers_on_a_slow_api(fake, start_worker, A, receipts, latency)
    for rid in receipts:
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(
        lambda: (
            len(unfinished_held(fake, ledger, w1)) >= 3 and fiscalised_count(fake, A, receipts) >= 3
        ),
        timeout=60,
        what="w1 busy with several results",
    )
    return w1, unfinished_held(fake, ledger, w1)


def test_fault_01_sigkill_mid_flight(r, fake, env, start_worker, ledger):
    for name in LEASE_VARIABLES:  # the worker's defaults: recovery as deployed
        env.pop(name, None)
    env[DEADLINE_VARIABLE] = "600"  # not a lease: far beyond this case, so it decides nothing
    w1, held = two_busy_workers(r, fake, ledger, start_worker, results=60, latency=1.5)
    killed_at = time.time()
    w1.kill()
    ledger.kill(killed_at)
    ledger.figure("held_by_killed_worker", len(held))
    try:
        wait_for(
            lambda: landed(fake, ledger, held),
            timeout=RECOVERY_TIMEOUT_SECONDS,
            interval=0.25,
            what="every result the killed worker held fiscalised",
        )
        recovery = time.time() - killed_at
        ledger.figure("recovery_s", recovery)
    except AssertionError:
        left = sorted(k for k in held if not landed(fake, ledger, {k}))
        ledger.figure("recovery_s", f">{RECOVERY_TIMEOUT_SECONDS} ({len(left)} still held)")
        raise
    # A message w1 had taken off the queue in the instant before its hold was recorded
    # (the BRPOP-to-task_received window) is still under its queue lease: it is re-driven
    # when that lapses, up to QUEUE_LEASE_SECONDS after it was published.
    settled = ledger.settle(timeout=QUEUE_LEASE_SECONDS + 60)
    ledger.figure("settled_after_kill_s", time.time() - killed_at)
    ledger.check(settled)
    assert recovery <= RECOVERY_TIMEOUT_SECONDS


def test_fault_02_sigterm_while_busy(r, fake, start_worker, ledger):
    w1, held = two_busy_workers(r, fake, ledger, start_worker, results=40, latency=1.0)
    assert w1.process is not None
    started = time.monotonic()
    w1.process.send_signal(signal.SIGTERM)
    wait_for(lambda: not alive(w1), timeout=60, interval=0.05, what="w1 exits after SIGTERM")
    exit_seconds = time.monotonic() - started
    code = w1.process.returncode
    w1.stop()  # reap stray pool children, if any
    ledger.figure("held_at_sigterm", len(held))
    ledger.figure("sigterm_exit_s", exit_seconds)
    ledger.figure("exit_code", code)
    wait_for(lambda: landed(fake, ledger, held), timeout=60, what="w1's results finished")
    ledger.figure("held_done_after_s", time.monotonic() - started)
    settled = ledger.settle(timeout=60)
    ledger.check(settled)
    assert code == 0, f"warm shutdown exit code {code}"
    assert exit_seconds <= 30, "longer than Kubernetes' default grace period"
    assert "Traceback" not in w1.log()


def test_fault_09_stream_entries_of_a_dead_consumer_are_claimed_once(r, fake, start_worker, ledger):
    receipts = range(1, 41)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    r.xgroup_create("fiscal:results", keys.INGEST_GROUP, id="0", mkstream=True)
    for rid in range(1, 21):
        ledger.send(r, A, rid, f"F-{rid}")
    # A consumer reads them and dies before acknowledging anything.
    [(_, read)] = r.xreadgroup(keys.INGEST_GROUP, "dead-consumer", {"fiscal:results": ">"}, 100)
    assert len(read) == 20
    assert r.xpending("fiscal:results", keys.INGEST_GROUP)["pending"] == 20
    wide = wide_budget(fake)
    w1 = start_worker("w1", **wide)
    w2 = start_worker("w2", **wide)
    for rid in range(21, 41):
        ledger.send(r, A, rid, f"F-{rid}")

    def nothing_pending() -> bool:
        return r.xpending("fiscal:results", keys.INGEST_GROUP)["pending"] == 0

    settled = ledger.settle(timeout=60, extra=nothing_pending)
    ledger.check(settled)
    stats = fake.stats()["receipts"]
    reads = {rid: stats.get(f"{A}:{rid}", {}).get("get", 0) for rid in receipts}
    ledger.figure("max_get_per_receipt", max(reads.values()))
    twice = [rid for rid, n in reads.items() if n != 1]
    assert not twice, f"processed more than once: {twice}\n" + "\n".join(
        line for rid in twice[:2] for line in lines_about((w1, w2), A, rid)
    )
    received = (w1.log() + w2.log()).count("event=result_received")
    assert received == 40, f"{received} ingest records for 40 entries"
