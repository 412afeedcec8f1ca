"""The pipeline in process, burst style (tests/burst.py): fakeredis, a test clock, a fake
Clopos behind MockTransport; admit -> run -> move the clock until idle. Each test pins one
path where a result could starve, vanish or be overwritten."""

from __future__ import annotations

import httpx
import pytest
from burst import BRAND, Burst

from worker import keys


def test_results_are_fiscalised_once_each():
    bench = Burst()
    for receipt_id in (1, 2, 3):
        bench.add_receipt(receipt_id)
        bench.send(receipt_id, f"F-{receipt_id}")
    bench.run()
    for receipt_id in (1, 2, 3):
        assert bench.api.patches(receipt_id) == [{"fiscal_id": f"F-{receipt_id}", "lock": True}]
    assert bench.unfinished() == 0 and bench.dead_letters() == []


def test_a_receipt_found_on_a_not_ready_retry_gets_its_patch_without_queueing_again():
    # A brand fed above its budget (3 results/s against ~1.9 results/s) for a minute; one
    # receipt is missing for its first 3 s. Once its retry finds it, the PATCH goes next.
    bench = Burst(limit=20, window=5)
    bench.add_receipt(999, appear_after=3)
    bench.send(999, "F-999")
    for i in range(180):
        bench.add_receipt(i + 1)
        bench.feed(i / 3, i + 1, f"F-{i + 1}")
    bench.run()
    found = [c for c in bench.api.of(999, "GET") if c.status == 200]
    [patch] = [c for c in bench.api.of(999, "PATCH") if c.status == 200]
    assert len(found) == 1, "the result went back through admission after its receipt was found"
    assert patch.at - found[0].at < 3
    backlog_left = sum(1 for c in bench.api.calls if c.method == "PATCH" and c.at > patch.at)
    assert backlog_left > 50, "fiscalised only once the brand's backlog had drained"
    assert bench.unfinished() == 0 and bench.dead_letters() == []


def always_429(api, request, receipt_id):
    if receipt_id:
        return httpx.Response(
            429, json={"success": False}, headers={"RateLimit-Reset": "30", "Retry-After": "30"}
        )
    return None


def test_a_429_storm_longer_than_the_window_ends_in_retries_exhausted_not_in_silence():
    bench = Burst(transient_window=120, not_ready_window=60)
    bench.api.hooks.append(always_429)
    rids = []
    for receipt_id in (1, 2, 3):
        bench.add_receipt(receipt_id)
        rids.append(bench.send(receipt_id, f"F-{receipt_id}"))
    started = bench.clock()
    bench.run()
    letters = bench.dead_letters()
    assert sorted(e["result_id"] for e in letters) == sorted(rids)
    assert {e["reason"] for e in letters} == {"retries_exhausted"}
    assert bench.clock() - started <= 120 + 30 + 5  # at the deadline, not long after it
    assert bench.unfinished() == 0
    for receipt_id in (1, 2, 3):
        assert bench.audit.get(BRAND, receipt_id)["state"] == "dead_lettered"


def test_a_schedule_entry_whose_record_vanished_is_dead_lettered_and_counted():
    bench = Burst()
    rid = bench.send(1, "F-1")  # no receipt: 404, parked for a retry
    bench.run(until=bench.clock() + 0.1)
    assert bench.r.exists(keys.result(rid))
    bench.r.delete(keys.result(rid))  # as an evicting Redis would
    bench.run()
    [entry] = bench.dead_letters()
    assert entry["result_id"] == rid and entry["reason"] == "retries_exhausted"
    assert "record is gone" in entry["error"]
    assert bench.r.hget(keys.COUNTERS, "orphans") == "1"
    assert bench.r.hget(keys.COUNTERS, "dead_lettered:retries_exhausted") == "1"  # counted
    assert bench.unfinished() == 0


def test_a_record_without_a_schedule_entry_is_put_back_and_runs():
    bench = Burst()
    bench.add_receipt(1)
    rid = bench.send(1, "F-1")
    bench.r.zrem(keys.SCHEDULE, rid)
    bench.run()
    assert bench.api.patches(1) == []  # nothing would ever run it
    assert bench.dispatcher.sweep_unscheduled() == 1
    bench.run()
    assert bench.api.patches(1) == [{"fiscal_id": "F-1", "lock": True}]
    assert bench.r.hget(keys.COUNTERS, "unscheduled") == "1"


def expire_token_on_first_patch(api, request, receipt_id):
    if request.method == "PATCH" and not any(c.method == "PATCH" for c in api.of(receipt_id)):
        return httpx.Response(401, json={"success": False, "error": "token_expired"})
    return None


def test_a_lock_lost_during_a_re_auth_is_never_followed_by_a_patch_over_another_fiscal_id():
    bench = Burst()
    bench.add_receipt(5)
    bench.api.hooks.append(expire_token_on_first_patch)

    def take_over(api, request, receipt_id):
        if api.tokens_issued == 2 and not receipt_id:  # the re-auth after the 401: meanwhile
            bench.r.set(keys.receipt_lock(BRAND, 5), "another-run")  # our lock lapsed, another
            api.receipts[5].update(fiscal_id="OTHER", lock=True)  # run took it and fiscalised
        return None

    bench.api.hooks.append(take_over)
    bench.send(5, "F-5")
    bench.run(until=bench.clock() + 0.5)
    assert [c.body for c in bench.api.of(5, "PATCH") if c.status == 200] == []
    bench.r.delete(keys.receipt_lock(BRAND, 5))  # the other run is done
    bench.run()
    assert bench.api.receipts[5]["fiscal_id"] == "OTHER"
    [entry] = bench.dead_letters()
    assert entry["reason"] == "fiscal_id_conflict"


def test_a_run_whose_lock_lapsed_unclaimed_takes_it_again_and_reads_again_first():
    bench = Burst()
    bench.add_receipt(5)
    bench.api.hooks.append(expire_token_on_first_patch)

    lapsed = []

    def lapse(api, request, receipt_id):
        if api.tokens_issued == 2 and not lapsed:  # the re-auth after the 401, once
            lapsed.append(bench.r.delete(keys.receipt_lock(BRAND, 5)))
        return None

    bench.api.hooks.append(lapse)
    bench.send(5, "F-5")
    bench.run()
    assert [c.status for c in bench.api.of(5)] == [200, 401, 200, 200]  # GET, PATCH, GET, PATCH
    assert bench.api.patches(5) == [{"fiscal_id": "F-5", "lock": True}]


def test_a_run_that_lost_its_result_writes_nothing():
    bench = Burst()
    bench.add_receipt(6)
    rid = bench.send(6, "F-6")

    def republish_then_fail(api, request, receipt_id):
        if request.method == "GET" and len(api.of(6, "GET")) == 0:
            bench.r.hincrby(keys.result(rid), "dispatch", 1)  # its lease lapsed meanwhile
            return httpx.Response(500, json={"success": False})
        return None

    bench.api.hooks.append(republish_then_fail)
    bench.dispatcher.run_once()
    outcome = bench.fiscaliser.run(*bench.queue.popleft())
    assert outcome.kind == "stale"
    record = bench.r.hgetall(keys.result(rid))
    assert record.get("failures") is None and record.get("transient_since") is None
    assert record["state"] == "running"  # as the newer dispatch will find it


@pytest.mark.parametrize(
    "status,body",
    [
        (403, {"success": False, "error": "forbidden", "message": "token revoked"}),
        (200, {"success": False, "error": "token_revoked"}),
    ],
)
def test_a_token_refused_without_a_401_is_replaced_and_the_result_lands(status, body):
    bench = Burst()
    bench.add_receipt(7)

    def refuse_first(api, request, receipt_id):
        return httpx.Response(status, json=body) if len(api.of(7)) == 0 and receipt_id else None

    bench.api.hooks.append(refuse_first)
    bench.send(7, "F-7")
    bench.run()
    assert bench.api.patches(7) == [{"fiscal_id": "F-7", "lock": True}]
    assert bench.api.tokens_issued == 2 and bench.dead_letters() == []


def test_a_200_not_found_ends_as_receipt_not_found_and_an_open_receipt_as_not_closed():
    bench = Burst(not_ready_window=30)
    bench.add_receipt(9, status=1, closed_at=None)

    def not_found_200(api, request, receipt_id):
        if receipt_id == 8:
            return httpx.Response(200, json={"success": False, "error": "not_found"})
        return None

    bench.api.hooks.append(not_found_200)
    bench.send(8, "F-8")
    bench.send(9, "F-9")
    bench.run()
    reasons = {e["receipt_id"]: e["reason"] for e in bench.dead_letters()}
    assert reasons == {8: "receipt_not_found", 9: "receipt_not_closed"}


def test_a_patch_of_unknown_outcome_holds_the_receipt_until_it_has_surely_landed():
    bench = Burst()
    bench.add_receipt(11)
    cut = []

    def land_then_time_out(api, request, receipt_id):
        if request.method == "PATCH" and not cut:
            cut.append(1)
            api.receipts[11].update(fiscal_id="F-11", lock=True)  # it landed; the answer did not
            raise httpx.ReadTimeout("read timed out")
        return None

    bench.api.hooks.append(land_then_time_out)
    first = bench.send(11, "F-11")
    bench.dispatcher.run_once()
    assert bench.fiscaliser.run(*bench.queue.popleft()).kind == "parked"
    held = bench.r.pttl(keys.receipt_lock(BRAND, 11))
    assert 5_000 < held <= 10_000, "the receipt is not held while the PATCH may be in flight"
    bench.send(11, "OTHER")  # another result for the receipt, waiting for the lock
    bench.clock.now += 1
    bench.dispatcher.run_once()
    for rid, dispatch in list(bench.queue):  # neither the other result nor our own re-run
        assert bench.fiscaliser.run(rid, dispatch).detail.startswith("receipt busy"), rid
    bench.queue.clear()
    assert bench.api.of(11, "PATCH") == []  # no PATCH since the one in flight (not recorded)
    bench.r.delete(keys.receipt_lock(BRAND, 11))  # the in-flight hold ran out
    bench.run()
    assert bench.api.receipts[11]["fiscal_id"] == "F-11"
    assert bench.api.of(11, "PATCH") == []  # the re-run's GET saw it had landed
    assert [e["reason"] for e in bench.dead_letters()] == ["fiscal_id_conflict"]
    assert first in bench.sent


def test_a_probe_that_meets_a_401_keeps_its_probe_for_the_re_try():
    bench = Burst()
    bench.add_receipt(12)
    bench.r.hset(
        keys.breaker(BRAND),
        mapping={"state": "open", "until": str(bench.clock() - 1), "cooldown": "5"},
    )

    def expire_token_on_first_get(api, request, receipt_id):  # the probe call itself
        if receipt_id and not api.of(receipt_id):
            return httpx.Response(401, json={"success": False, "error": "token_expired"})
        return None

    bench.api.hooks.append(expire_token_on_first_get)
    bench.send(12, "F-12")
    bench.dispatcher.run_once()
    assert bench.fiscaliser.run(*bench.queue.popleft()).kind == "fiscalised"  # in one run
    assert bench.api.patches(12) == [{"fiscal_id": "F-12", "lock": True}]
    assert not bench.r.exists(keys.breaker_probe(BRAND))  # the probe was not left behind
    assert not bench.r.exists(keys.breaker(BRAND))  # and its success closed the circuit


def test_a_damaged_record_is_dead_lettered_not_retried_forever():
    bench = Burst()
    rid = bench.send(13, "F-13")
    bench.r.hset(keys.result(rid), "result", "{not json")
    bench.run()
    [entry] = bench.dead_letters()
    assert entry["result_id"] == rid and "damaged" in entry["error"]
    assert entry["payload"] == '{"receipt_id": 13, "brand": "b1", "fiscal_id": "F-13"}'
    assert bench.unfinished() == 0


def test_rejected_credentials_reach_auth_failed_after_bounded_retries_not_a_cool_down():
    bench = Burst()

    def reject(api, request, receipt_id):
        if not receipt_id:
            return httpx.Response(401, json={"success": False, "error": "authentication_failed"})
        return None

    bench.api.hooks.append(reject)
    for receipt_id in range(20, 30):
        bench.add_receipt(receipt_id)
        bench.send(receipt_id, f"F-{receipt_id}")
    started = bench.clock()
    bench.run()
    assert {e["reason"] for e in bench.dead_letters()} == {"auth_failed"}
    assert len(bench.dead_letters()) == 10
    assert bench.clock() - started < 300  # no doubling cool-downs in between
    assert sum(1 for c in bench.api.calls if c.method == "AUTH") <= 15


def reject_auth(api, request, receipt_id):
    if not receipt_id:
        return httpx.Response(401, json={"success": False, "error": "authentication_failed"})
    return None


def test_a_rejected_auth_neither_clears_the_circuits_failures_nor_closes_it():
    bench = Burst()
    bench.api.hooks.append(reject_auth)
    bench.add_receipt(31)
    bench.r.hset(keys.breaker(BRAND), mapping={keys.BREAKER_FAILURES: "4"})
    bench.send(31, "F-31")
    bench.dispatcher.run_once()
    assert bench.fiscaliser.run(*bench.queue.popleft()).kind == "parked"
    assert bench.r.hget(keys.breaker(BRAND), keys.BREAKER_FAILURES) == "4"  # not reset

    half_open = {"state": "open", "until": str(bench.clock() - 1), "cooldown": "5"}
    bench.r.hset(keys.breaker(BRAND), mapping=half_open)
    bench.clock.now += 120  # past the remembered rejection: a real /v2/auth again
    bench.dispatcher.run_once()
    assert bench.fiscaliser.run(*bench.queue.popleft()).kind == "parked"
    assert bench.r.hget(keys.breaker(BRAND), keys.BREAKER_STATE) == "open"  # not closed
    assert not bench.r.exists(keys.breaker_probe(BRAND))  # the probe is free for another
    assert not any(c.method in ("GET", "PATCH") for c in bench.api.calls)
