"""The result store and its admission script (fakeredis runs the Lua): leases, dispatch
numbers, and what admission reserves in the brand's budget, or does not."""

from __future__ import annotations

import pytest

from worker import keys
from worker.ratelimit import RatePolicy
from worker.store import ResultStore

NOW = 1_000_000.0
POLICY = RatePolicy(limit=60, window=60, margin=0, lead=1.0)  # cap 59: one slot per ~1.017 s


@pytest.fixture
def store(r):
    return ResultStore(r, rate=POLICY, lifetime=3600, queue_lease=120, run_lease=60)


def add(store, rid, receipt_id=1, brand="b"):
    result = {"receipt_id": receipt_id, "brand": brand, "fiscal_id": "F"}
    assert store.create(rid, result, "{}", score=NOW, now=NOW)


def tat(r, brand="b"):
    value = r.get(keys.rate_tat(brand))
    return None if value is None else float(value)


def test_create_is_idempotent_for_a_reclaimed_entry(store):
    add(store, "r1")
    assert not store.create(
        "r1", {"receipt_id": 1, "brand": "b", "fiscal_id": "G"}, "{}", score=NOW, now=NOW
    )


def test_admission_publishes_what_has_a_slot_now_and_parks_the_rest(r, store):
    for i in range(4):
        add(store, f"r{i}", receipt_id=i + 1)
    admission = store.admit_due(NOW, 10)
    assert [c.rid for c in admission.publish] == ["r0"]  # 2 slots each: r1 starts ~2 s later
    assert admission.parked == 3
    assert r.zscore(keys.SCHEDULE, "r0") == pytest.approx(NOW + 30)  # publish lease
    assert store.published(admission.publish, NOW + 0.1) == 1  # in the queue now
    assert r.zscore(keys.SCHEDULE, "r0") == pytest.approx(NOW + 0.1 + 120)  # queue lease
    assert r.zscore(keys.SCHEDULE, "r1") == pytest.approx(NOW + 2 * 60 / 59 - 1, abs=1e-3)
    assert tat(r) == pytest.approx(NOW + 8 * 60 / 59, abs=1e-3)
    assert store.admit_due(NOW, 10).handled == 0  # nothing due again before its slot


def test_a_fiscalised_receipt_is_published_without_a_slot(r, store):
    r.hset(keys.receipt("b", 7), mapping={"s": "f", "f": "F"})
    add(store, "r1", receipt_id=7)
    assert [c.rid for c in store.admit(["r1"], NOW).publish] == ["r1"]
    assert tat(r) is None


def test_a_receipt_fiscalised_under_a_legacy_marker_is_published_without_a_slot(r, store):
    r.set(keys.legacy_fiscalised("b", 7), "F")  # the layout before, or an older worker
    r.hset(keys.receipt("b", 7), mapping={"s": "p"})  # beside a record a new one began
    add(store, "r1", receipt_id=7)
    assert [c.rid for c in store.admit(["r1"], NOW).publish] == ["r1"]
    assert tat(r) is None


def test_an_open_circuit_holds_results_without_reserving(r, store):
    r.hset(keys.breaker("b"), mapping={"state": "open", "until": str(NOW + 30), "cooldown": "30"})
    add(store, "r1")
    admission = store.admit(["r1"], NOW)
    assert admission.publish == [] and admission.parked == 1
    assert NOW + 30 <= r.zscore(keys.SCHEDULE, "r1") <= NOW + 60
    assert tat(r) is None
    assert r.hget(keys.result("r1"), "slot") is None


def test_a_paused_brand_holds_results_without_reserving(r, store):
    r.set(keys.rate_pause("b"), str(NOW + 10))
    add(store, "r1")
    assert store.admit(["r1"], NOW).parked == 1
    assert r.zscore(keys.SCHEDULE, "r1") >= NOW + 10
    assert tat(r) is None


def test_a_not_ready_retry_reserves_only_its_get(r, store):
    add(store, "r1")
    r.hset(keys.result("r1"), "not_ready_since", str(NOW - 30))
    store.admit(["r1"], NOW)
    assert r.hget(keys.result("r1"), "slots") == "1"
    assert tat(r) == pytest.approx(NOW + 60 / 59, abs=1e-3)


def test_begin_runs_only_the_current_dispatch(r, store):
    add(store, "r1")
    [claimed] = store.admit(["r1"], NOW).publish
    record = store.begin("r1", claimed.dispatch, NOW)
    assert not isinstance(record, str) and record.slot == pytest.approx(NOW) and record.slots == 2
    assert store.begin("r1", claimed.dispatch - 1, NOW) == "stale"
    assert r.zscore(keys.SCHEDULE, "r1") == pytest.approx(NOW + 60)  # run lease
    pipe = r.pipeline()
    store.forget("r1", pipeline=pipe)
    pipe.execute()
    assert store.begin("r1", claimed.dispatch, NOW) == "gone"


def test_an_orphan_in_the_schedule_is_kept_and_reported_not_dropped(r, store):
    r.zadd(keys.SCHEDULE, {"ghost": NOW - 1})
    admission = store.admit_due(NOW, 10)
    assert admission.orphans == ["ghost"] and admission.handled == 0
    # Kept (for the dispatcher to dead-letter), and not looked at again in every pass.
    assert r.zscore(keys.SCHEDULE, "ghost") == pytest.approx(NOW + 60)
    assert store.admit_due(NOW + 1, 10).orphans == []


def test_a_live_record_never_expires_and_carries_its_deadline(r, store):
    add(store, "r1")
    assert r.ttl(keys.result("r1")) == -1
    assert float(r.hget(keys.result("r1"), "deadline")) == pytest.approx(NOW + 3600)


def test_begin_removes_the_ttl_an_older_version_gave_a_record(r, store):
    add(store, "r1")
    r.expire(keys.result("r1"), 100)
    [claimed] = store.admit(["r1"], NOW).publish
    record = store.begin("r1", claimed.dispatch, NOW)
    assert r.ttl(keys.result("r1")) == -1
    assert not isinstance(record, str) and record.deadline == pytest.approx(NOW + 3600)


def test_a_result_past_its_deadline_is_published_at_once_whatever_holds_it(r, store):
    r.set(keys.rate_pause("b"), str(NOW + 10_000))
    add(store, "r1")
    assert store.admit(["r1"], NOW).parked == 1
    assert r.zscore(keys.SCHEDULE, "r1") <= NOW + 3600  # never parked past the deadline
    assert [c.rid for c in store.admit_due(NOW + 3600, 10).publish] == ["r1"]


def test_a_reserved_slot_beyond_the_deadline_parks_only_until_the_deadline(r, store):
    r.set(keys.rate_tat("b"), str(NOW + 7200))  # a two-hour backlog
    add(store, "r1")
    assert store.admit(["r1"], NOW).parked == 1
    assert r.zscore(keys.SCHEDULE, "r1") == pytest.approx(NOW + 3600)


def test_a_result_under_way_reserves_ahead_of_the_queue(r, store):
    r.set(keys.rate_tat("b"), str(NOW + 500))  # the brand's backlog
    add(store, "r1")
    r.hset(keys.result("r1"), mapping={"first": "1", "not_ready_since": str(NOW - 5)})
    [claimed] = store.admit(["r1"], NOW).publish  # no wait behind the backlog
    assert claimed.rid == "r1"
    assert r.hget(keys.result("r1"), "slots") == "2"  # its GET and its PATCH
    assert tat(r) == pytest.approx(NOW + 500 + 2 * 60 / 59, abs=1e-3)  # the queue moves back


def test_hold_renews_only_queued_or_running_results_of_the_same_dispatch(r, store):
    for rid in ("queued", "running", "parked", "stale"):
        add(store, rid)
    store.admit(["queued", "running", "parked", "stale"], NOW)  # spread over slots
    for rid in ("queued", "running", "parked", "stale"):
        r.hset(keys.result(rid), mapping={"dispatch": "1", "state": "queued"})
    r.hset(keys.result("running"), "state", "running")
    r.hset(keys.result("parked"), "state", "parked")
    before = {rid: r.zscore(keys.SCHEDULE, rid) for rid in ("parked", "stale")}
    held = [("queued", 1), ("running", 1), ("parked", 1), ("stale", 0), ("gone", 1)]
    assert store.hold(held, NOW + 45) == 2
    assert r.zscore(keys.SCHEDULE, "queued") == r.zscore(keys.SCHEDULE, "running") == NOW + 45
    assert {rid: r.zscore(keys.SCHEDULE, rid) for rid in ("parked", "stale")} == before
    assert r.zscore(keys.SCHEDULE, "gone") is None


def test_published_leaves_alone_a_result_a_worker_received_first(r, store):
    add(store, "r1")
    [claimed] = store.admit(["r1"], NOW).publish
    assert store.hold([("r1", claimed.dispatch)], NOW + 5) == 1  # received before we knew
    assert store.published([claimed], NOW + 0.1) == 0
    assert r.zscore(keys.SCHEDULE, "r1") == NOW + 5  # the receiver's heartbeat owns it


def test_a_receipt_lock_of_an_older_dispatch_of_the_same_result_is_taken_over(r):
    from worker.idempotency import ReceiptLock

    dead = ReceiptLock(r, "b", 1, "r1", 3, seconds=100)
    assert dead.acquire()  # then its worker died, the lock still alive
    assert not ReceiptLock(r, "b", 1, "r2", 9, seconds=100).acquire()  # another result waits
    assert not ReceiptLock(r, "b", 1, "r1", 3, seconds=100).acquire()  # the same dispatch too
    assert not ReceiptLock(r, "b", 1, "r10", 9, seconds=100).acquire()  # a longer rid: another
    newer = ReceiptLock(r, "b", 1, "r1", 4, seconds=100)
    assert newer.acquire() and r.get(keys.receipt_lock("b", 1)) == newer.token


def begun(store, rid="r1"):
    add(store, rid)
    [claimed] = store.admit([rid], NOW).publish
    record = store.begin(rid, claimed.dispatch, NOW)
    assert not isinstance(record, str)
    return record


def test_fence_extends_lock_and_lease_only_for_the_holder_of_both(r, store):
    from worker.idempotency import ReceiptLock

    record = begun(store)
    lock = ReceiptLock(r, "b", 1, "r1", 1, seconds=10)
    assert lock.acquire()
    assert store.fence(record, lock, NOW + 5) == "ok"
    assert r.pttl(keys.receipt_lock("b", 1)) > 9_000
    assert r.zscore(keys.SCHEDULE, "r1") == pytest.approx(NOW + 5 + 60)
    r.set(keys.receipt_lock("b", 1), "someone-else")
    assert store.fence(record, lock, NOW + 6) == "lock_lost"
    r.hincrby(keys.result("r1"), "dispatch", 1)
    assert store.fence(record, lock, NOW + 7) == "superseded"


def test_a_fenced_write_of_a_superseded_run_writes_nothing(r, store):
    from worker.store import Superseded

    record = begun(store)
    r.hincrby(keys.result("r1"), "dispatch", 1)  # its lease lapsed; published again
    with pytest.raises(Superseded), store.fenced(record) as pipe:
        store.park(record, NOW + 10, pipeline=pipe)
    assert r.hget(keys.result("r1"), "state") == "running"


def test_a_fenced_write_never_recreates_a_finished_record(r, store):
    from worker.store import Superseded

    record = begun(store)
    pipe = r.pipeline()
    store.forget("r1", pipeline=pipe)
    pipe.execute()
    with pytest.raises(Superseded), store.fenced(record) as pipe:
        store.park(record, NOW + 10, pipeline=pipe)
    assert not r.exists(keys.result("r1")) and r.zscore(keys.SCHEDULE, "r1") is None


def test_a_fenced_write_raced_by_a_new_dispatch_is_aborted(r, store):
    from worker.store import Superseded

    record = begun(store)
    with pytest.raises(Superseded), store.fenced(record) as pipe:
        r.hincrby(keys.result("r1"), "dispatch", 1)  # another process, between WATCH and EXEC
        store.park(record, NOW + 10, pipeline=pipe)
    assert r.hget(keys.result("r1"), "state") == "running"


def test_reschedule_lost_puts_back_only_records_without_an_entry(r, store):
    add(store, "r1")
    add(store, "r2")
    r.zrem(keys.SCHEDULE, "r2")
    assert store.reschedule_lost(["r1", "r2", "ghost"], NOW + 5) == ["r2"]
    assert r.zscore(keys.SCHEDULE, "r2") == NOW + 5
    assert r.zscore(keys.SCHEDULE, "ghost") is None


def test_a_damaged_counter_reads_as_unset_instead_of_failing_the_result():
    from worker.store import ResultRecord

    raw = {
        "result": '{"receipt_id": 1, "brand": "b", "fiscal_id": "F"}',
        "first_seen": str(NOW),
        "dispatch": "3",
        "last_status": "False",
        "attempts": "x",
        "slot": "",
    }
    record = ResultRecord.from_hash("r1", raw)
    assert (record.dispatch, record.last_status, record.attempts, record.slot) == (3, None, 0, None)


def racing(store, step):
    """Run `step` between admission's read of the candidates and its script."""
    script = store._admit

    def admit(keys, args):
        step()
        return script(keys=keys, args=args)

    store._admit = admit


def test_admission_rechecks_what_it_read_and_skips_what_another_dispatcher_took(r, store):
    add(store, "r1")
    add(store, "r2", receipt_id=2)
    other = ResultStore(r, rate=POLICY, lifetime=3600, queue_lease=120, run_lease=60)
    racing(store, lambda: other.admit_due(NOW, 10))  # publishes r1, parks r2
    admission = store.admit_due(NOW, 10)
    assert admission.publish == [] and admission.parked == 0 and admission.orphans == []
    assert admission.skipped == 2  # the dispatcher goes again at once
    assert r.hget(keys.result("r1"), "dispatch") == "1"  # admitted once
    assert tat(r) == pytest.approx(NOW + 4 * 60 / 59, abs=1e-3)  # reserved once


def test_admission_skips_a_record_that_is_not_the_one_it_read(r, store):
    add(store, "r1")

    def replaced():
        r.delete(keys.result("r1"))
        add(store, "r1", receipt_id=9, brand="c")

    racing(store, replaced)
    admission = store.admit_due(NOW, 10)
    assert (admission.handled, admission.skipped) == (0, 1)
    assert tat(r, "b") is None and tat(r, "c") is None  # nothing reserved with the wrong keys
    assert r.hget(keys.result("r1"), "state") == "due"
    store._admit = ResultStore(r, rate=POLICY)._admit
    [claimed] = store.admit_due(NOW, 10).publish  # the next pass reads it again
    assert (claimed.brand, claimed.receipt_id) == ("c", "9")
    assert tat(r, "c") is not None


def test_admission_passes_the_keys_of_each_brand_and_receipt(r, store):
    add(store, "r1", brand="b")
    add(store, "r2", receipt_id=7, brand="c")
    r.hset(keys.receipt("c", 7), mapping={"s": "f", "f": "F"})
    r.hset(
        keys.breaker("b"),
        mapping={keys.BREAKER_STATE: keys.BREAKER_OPEN, keys.BREAKER_UNTIL: str(NOW + 30)},
    )
    r.zadd(keys.SCHEDULE, {"ghost": NOW - 1})
    admission = store.admit_due(NOW, 10)
    assert [c.rid for c in admission.publish] == ["r2"]  # fiscalised: no slot needed
    assert admission.parked == 1 and admission.orphans == ["ghost"]  # r1: circuit open
    assert r.zscore(keys.SCHEDULE, "r1") >= NOW + 30
    assert tat(r, "b") is None and tat(r, "c") is None
