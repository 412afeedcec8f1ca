"""The result store and its admission script (fakeredis runs the Lua): leases, dispatch
numbers, and what admission reserves in the brand's budget, or does not."""

from __future__ import annotations

import fakeredis
import pytest

from worker import keys
from worker.ratelimit import RatePolicy
from worker.store import ResultStore

NOW = 1_000_000.0
POLICY = RatePolicy(limit=60, window=60, margin=0, lead=1.0)  # cap 59: one slot per ~1.017 s


@pytest.fixture
def r():
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def store(r):
    return ResultStore(r, record_ttl=3600, rate=POLICY, queue_lease=120, run_lease=60)


def add(store, rid, receipt_id=1, brand="b"):
    result = {"receipt_id": receipt_id, "brand": brand, "fiscal_id": "F"}
    assert store.create(rid, result, "{}", score=NOW, now=NOW)


def tat(r, brand="b"):
    value = r.get(keys.rate_prefix(brand) + "tat")
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
    assert r.zscore(keys.SCHEDULE, "r0") == pytest.approx(NOW + 120)  # queue lease
    assert r.zscore(keys.SCHEDULE, "r1") == pytest.approx(NOW + 2 * 60 / 59 - 1, abs=1e-3)
    assert tat(r) == pytest.approx(NOW + 8 * 60 / 59, abs=1e-3)
    assert store.admit_due(NOW, 10).handled == 0  # nothing due again before its slot


def test_a_fiscalised_receipt_is_published_without_a_slot(r, store):
    r.set(keys.fiscalised("b", 7), "F")
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
    r.set(keys.rate_prefix("b") + "pause", str(NOW + 10))
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
    store.forget("r1", pipe)
    pipe.execute()
    assert store.begin("r1", claimed.dispatch, NOW) == "gone"


def test_orphans_in_the_schedule_are_dropped(r, store):
    r.zadd(keys.SCHEDULE, {"ghost": NOW - 1})
    assert store.admit_due(NOW, 10).handled == 0
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
