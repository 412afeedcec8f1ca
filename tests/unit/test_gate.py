"""The hot path's two round trips per request (worker/gate.py) with fakeredis: every verdict
of gate_check and what it writes (nothing unless all pass), gate_record's budget, breaker,
audit and counters in one pipeline, and what one fiscalised result costs Redis."""

from __future__ import annotations

import pytest
from burst import BRAND, Burst

from worker import keys, telemetry
from worker.audit import AuditTrail
from worker.breaker import CircuitBreaker
from worker.errors import RateLimitInfo
from worker.gate import Answered, Attempt, RequestGate
from worker.idempotency import ReceiptLock
from worker.ratelimit import RatePolicy

RID = "1700000000000-0"


@pytest.fixture
def gate(r, clock):
    breaker = CircuitBreaker(r, threshold=2, cooldown=5, max_cooldown=60, clock=clock)
    audit = AuditTrail(r, ttl_seconds=3600, max_attempts=10)
    return RequestGate(
        r, breaker=breaker, rate=RatePolicy(limit=10, window=60), audit=audit, run_lease=120
    )


@pytest.fixture
def lock(r):
    r.hset(keys.result(RID), "dispatch", 3)
    r.zadd(keys.SCHEDULE, {RID: 1})
    taken = ReceiptLock(r, "b", 7, RID, 3, seconds=30)
    assert taken.acquire()
    return taken


def check(gate, lock, clock, probe=False):
    verdict, change = gate.check(RID, 3, lock, "b", probe=probe, now=clock())
    assert change is None
    return verdict


def answered(clock, ok, probe=False, rate=None, attempt=None):
    return Answered("b", rate, clock(), ok=ok, probe=probe, now=clock(), attempt=attempt)


def test_a_call_that_may_go_is_counted_and_extends_lock_and_lease(r, gate, lock, clock):
    r.pexpire(lock.key, 1000)
    verdict = check(gate, lock, clock)
    assert (verdict.verdict, verdict.probe) == ("ok", False)
    assert r.zcard(keys.rate_calls("b")) == 1
    assert r.pttl(lock.key) > 29_000
    assert r.zscore(keys.SCHEDULE, RID) == pytest.approx(clock() + 120)


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda r, lock: r.hset(keys.result(RID), "dispatch", 4), "superseded"),
        (lambda r, lock: r.set(lock.key, "another"), "lock_lost"),
        (lambda r, lock: r.set(keys.rate_pause("b"), "1000100"), "paused"),
        (lambda r, lock: r.set(keys.rate_others("b"), "9"), "full"),
    ],
)
def test_a_call_that_may_not_go_writes_nothing(r, gate, lock, clock, spoil, expected):
    spoil(r, lock)
    if expected != "lock_lost":
        r.pexpire(lock.key, 1000)  # an extension would show
    before = r.zscore(keys.SCHEDULE, RID)
    verdict = check(gate, lock, clock)
    assert verdict.verdict == expected
    assert r.zcard(keys.rate_calls("b")) == 0
    assert r.zscore(keys.SCHEDULE, RID) == before
    if expected != "lock_lost":
        assert r.pttl(lock.key) <= 1000
    if expected == "paused":
        assert verdict.at == 1000100
    if expected == "full":
        assert verdict.at == pytest.approx(clock() + 1)  # no call of ours to leave the window


def test_an_open_circuit_refuses_then_lets_one_probe(r, gate, lock, clock):
    for _ in range(2):
        gate.record(answered(clock, ok=False))
    verdict = check(gate, lock, clock)
    assert verdict.verdict == "open" and verdict.at == pytest.approx(clock() + 5)
    clock.now += 6
    probe = check(gate, lock, clock)
    assert (probe.verdict, probe.probe) == ("ok", True)  # this run is the probe
    other = ReceiptLock(r, "b", 8, RID, 3, seconds=30)
    assert other.acquire()
    assert check(gate, other, clock).verdict == "open"  # nobody else while it probes
    assert check(gate, lock, clock, probe=True).verdict == "ok"  # its re-try goes on
    change = gate.record(answered(clock, ok=True, probe=True))
    assert change.change == "closed"
    assert check(gate, other, clock).verdict == "ok"


def test_a_paused_probe_is_reported_so_the_run_can_let_it_go(r, gate, lock, clock):
    for _ in range(2):
        gate.record(answered(clock, ok=False))
    clock.now += 6
    r.set(keys.rate_pause("b"), repr(clock() + 30))
    verdict = check(gate, lock, clock)
    assert (verdict.verdict, verdict.probe) == ("paused", True)
    assert r.exists(keys.breaker_probe("b"))  # the run drops it (pipeline._drop_probe)


def test_a_get_recorded_with_the_patch_gate_goes_first_in_one_round_trip(r, gate, lock, clock):
    gate.record(answered(clock, ok=False))  # one failure before
    verdict, change = gate.check(
        RID, 3, lock, "b", probe=False, now=clock(), answered=answered(clock, ok=True)
    )
    assert verdict.verdict == "ok" and change is not None and change.change == ""
    assert not r.exists(keys.breaker("b"))  # the success reset the failures first


def test_a_probe_success_recorded_after_redis_lost_its_scripts_still_lets_the_patch_go(
    r, gate, lock, clock
):
    for _ in range(2):
        gate.record(answered(clock, ok=False))
    clock.now += 6
    assert check(gate, lock, clock).probe  # the GET is the probe
    r.script_flush()  # then Redis restarts: the record's EVALSHA meets NOSCRIPT
    verdict, change = gate.check(
        RID, 3, lock, "b", probe=False, now=clock(), answered=answered(clock, ok=True, probe=True)
    )
    assert change.change == "closed" and verdict.verdict == "ok"


def test_record_learns_others_use_and_writes_attempt_and_counters_in_one_go(r, gate, clock):
    r.zadd(keys.rate_calls("b"), {"c1": clock()})
    telemetry.buffer(r, "api:get_receipt:200", 2)
    attempt = Attempt("b", 7, "GET", 200, "ok")
    rate = RateLimitInfo(limit=10, remaining=5, reset_seconds=30)
    change = gate.record(answered(clock, ok=True, rate=rate, attempt=attempt))
    assert change.change == ""
    assert r.get(keys.rate_others("b")) == "4"  # 10 - 5 - our 1
    assert r.hget(keys.COUNTERS, "api:get_receipt:200") == "2"
    line = r.hget(keys.receipt("b", 7), "a0")
    assert line.split(" ")[1:] == ["GET", "200", "ok"]


def test_record_after_redis_lost_its_scripts_still_counts_the_call(r, gate, clock):
    r.script_flush()  # a restarted Redis: the EVALSHA meets NOSCRIPT, the script goes again
    attempt = Attempt("b", 7, "PATCH", 503, "transient")
    gate.record(answered(clock, ok=False, attempt=attempt))
    assert r.hget(keys.breaker("b"), keys.BREAKER_FAILURES) == "1"
    assert r.hget(keys.receipt("b", 7), "n") == "1"


def test_record_without_a_breaker_verdict_leaves_the_circuit(r, gate, clock):
    gate.record(answered(clock, ok=False))
    gate.record(answered(clock, ok=None))
    assert r.hget(keys.breaker("b"), keys.BREAKER_FAILURES) == "1"


def test_buffered_counts_go_only_to_their_own_redis(r):
    import fakeredis

    other = fakeredis.FakeRedis(decode_responses=True)
    telemetry.buffer(other, "patches", 1)
    pipe = r.pipeline()
    telemetry.drain(pipe)
    assert pipe.command_stack == []
    pipe = other.pipeline()
    telemetry.drain(pipe)
    pipe.execute()
    assert other.hget(keys.COUNTERS, "patches") == "1"


class Counting:
    """Counts the commands (a pipeline: one) sent to Redis through a client."""

    def __init__(self, r) -> None:
        self.round_trips = 0
        connection = r.connection_pool.get_connection()
        cls = type(connection)
        r.connection_pool.release(connection)
        original = cls.send_packed_command
        counter = self

        self.sent = []

        def send(self, command, check_health=True):
            counter.round_trips += 1
            counter.sent.append(command)
            return original(self, command, check_health)

        self.cls, self.original = cls, original
        cls.send_packed_command = send

    def stop(self) -> None:
        self.cls.send_packed_command = self.original


def test_a_fiscalised_result_costs_eight_round_trips_in_its_run():
    bench = Burst()
    bench.add_receipt(1)
    bench.add_receipt(2)
    bench.send(1, "F-1")
    bench.run()  # the brand's token is fetched and held in the process
    rid = bench.send(2, "F-2")
    bench.dispatcher.run_once()
    [(queued, dispatch)] = bench.queue
    assert queued == rid
    counting = Counting(bench.r)
    try:
        outcome = bench.fiscaliser.run(rid, dispatch)
    finally:
        counting.stop()
    assert outcome.kind.value == "fiscalised"
    assert bench.api.patches(2) == [{"fiscal_id": "F-2", "lock": True}]
    # begin, lock + marker, gate(GET), record(GET) + gate(PATCH), record(PATCH), WATCH,
    # HGET dispatch, MULTI/EXEC
    assert counting.round_trips == 8, counting.sent
    assert bench.audit.get(BRAND, 2)["state"] == "fiscalised"
    assert not bench.r.exists(keys.receipt_lock(BRAND, 2))  # released with the finish


def test_a_get_not_followed_by_a_patch_is_recorded_at_the_run_s_end():
    bench = Burst()
    bench.add_receipt(3, fiscal_id="F-3", lock=True)  # fiscalised already: no PATCH follows
    bench.r.hset(keys.breaker(BRAND), mapping={"state": "closed", "failures": 2})  # 2 failed
    rid = bench.send(3, "F-3")
    bench.dispatcher.run_once()
    [(queued, dispatch)] = bench.queue
    assert bench.fiscaliser.run(queued, dispatch).kind.value == "already_done"
    assert not bench.r.exists(keys.breaker(BRAND))  # the GET's success reached the breaker
    calls = [a["call"] for a in bench.audit.get(BRAND, 3)["attempts"]]
    assert calls == ["GET"] and rid == queued
