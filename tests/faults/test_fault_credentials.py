"""Credentials going bad: tokens expiring and revoked (401) mid-run, a token rejected
without a 401 (403, or 200 with success false), and one brand's credentials rejected
(auth_failed after bounded retries) until they are fixed and its dead letters replayed."""

from __future__ import annotations

import json
import math
import time

from faults.harness import budget, fiscalised_count, wide_budget
from support import closed, run_cli, wait_for

A, C = "openapitest", "brand2"


def auth_calls(fake, brand: str) -> int:
    return int(fake.stats()["auth_calls"].get(brand, 0))


def test_fault_08a_token_expires_and_is_revoked_mid_run(r, fake, start_worker, ledger):
    lifetime = 6.0
    fake.token_lifetime = lifetime
    settings = budget(fake, 20, 5.0)  # ~2 results/s: the run outlives several tokens
    receipts = range(1, 31)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    start_worker("w1", concurrency=4, **settings)  # 4 processes share one token
    started = time.time()
    for rid in receipts:
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: fiscalised_count(fake, A, receipts) >= 12, timeout=60, what="12 landed")
    fake.revoke_tokens(A)  # 401 invalid_token on the next call
    settled = ledger.settle(timeout=90)
    ledger.check(settled)
    run = max(t for rid in receipts for t in fake.stats()["receipts"][f"{A}:{rid}"]["patched_at"])
    run -= started
    # One token per lifetime (refreshed min(60 s, 10%) early), one after the revocation.
    bound = math.ceil(run / (lifetime * 0.9)) + 2
    calls = auth_calls(fake, A)
    unauthorized = sum(1 for e in fake.stats()["request_log"] if e[2] == A and e[4] == 401)
    ledger.figure("run_s", run)
    ledger.figure("auth_calls", calls)
    ledger.figure("auth_bound", bound)
    ledger.figure("401s", unauthorized)
    assert calls <= bound, f"{calls} auth calls in {run:.0f}s of {lifetime:.0f}s tokens"


def test_fault_08b_token_rejected_without_a_401(r, fake, start_worker, ledger):
    receipts = range(1, 31)
    for rid in receipts:
        fake.add_receipt(A, closed(rid))
    start_worker("w1", concurrency=4, **wide_budget(fake))
    for rid in range(1, 11):
        ledger.send(r, A, rid, f"F-{rid}")
    wait_for(lambda: fiscalised_count(fake, A, range(1, 11)) == 10, timeout=30)
    costs = {}
    for stage, rids, revoke in (
        ("403", range(11, 21), {"status": 403}),
        ("200 token_expired", range(21, 31), {"status": 200, "error": "token_expired"}),
    ):
        before = auth_calls(fake, A)
        fake.revoke_tokens(A, **revoke)  # the shared token is dead, but no 401 says so
        for rid in rids:
            ledger.send(r, A, rid, f"F-{rid}")
        settled = ledger.settle(timeout=30)
        costs[stage] = auth_calls(fake, A) - before
        ledger.figure(f"auth_calls_after_{stage.split()[0]}", costs[stage])
        ledger.check(settled, stage=f"after a {stage} revocation")
    # Drop the shared token and re-authenticate once, not once per result or per retry.
    assert all(1 <= n <= 2 for n in costs.values()), costs


def test_fault_08c_rejected_credentials_then_fixed_and_replayed(r, fake, env, start_worker, ledger):
    for rid in range(1, 11):
        fake.add_receipt(A, closed(rid))
        fake.add_receipt(C, closed(rid))
    fake.reject_auth(C)
    # A transient window longer than the auth retries need: the reason must be auth_failed.
    settings = {**wide_budget(fake), "FISCAL_TRANSIENT_RETRY_WINDOW_SECONDS": "60"}
    start_worker("w1", concurrency=4, **settings)
    started = time.monotonic()
    for rid in range(1, 11):
        ledger.send(r, C, rid, f"C-{rid}", expect="auth_failed")
        ledger.send(r, A, rid, f"A-{rid}")
    settled = ledger.settle(timeout=90)  # bounded: 5 tries, each after the 10 s memory
    ledger.figure("auth_failed_after_s", time.monotonic() - started)
    rejected = auth_calls(fake, C)
    ledger.figure("auth_calls_rejected_brand", rejected)
    attempts = [e["attempts"] for e in json.loads(run_cli(env, "dlq", "list", "--json").stdout)]
    ledger.figure(
        "attempts_per_dead_letter", f"{min(attempts, default=0)}-{max(attempts, default=0)}"
    )
    ledger.check(settled, stage="credentials rejected")
    assert rejected <= 5, f"{rejected} /v2/auth calls for a brand whose credentials fail"

    fake.reject_auth(C, False)  # the operator fixes the credentials...
    replay = run_cli(env, "dlq", "replay", "--brand", C)  # ...and replays at once
    assert replay.returncode == 0, replay.stderr
    for rid in range(1, 11):
        ledger.expect(f"{C}:{rid}", "fiscalised")
    settled = ledger.settle(timeout=60)
    ledger.figure("auth_calls_rejected_brand_total", auth_calls(fake, C))
    ledger.check(settled, stage="fixed and replayed")
