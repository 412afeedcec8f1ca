"""The path of a result in one process, burst-style: stream entry -> IngestConsumer ->
ResultStore -> Dispatcher -> Fiscaliser -> the fake API, run until idle (tests/burst.py)."""

from __future__ import annotations

import json

from burst import BRAND, Burst

from worker import keys


def entry(receipt_id: int, fiscal_id: str | None = None, **extra) -> dict:
    return {
        "receipt_id": receipt_id,
        "brand": BRAND,
        "fiscal_id": fiscal_id or f"F-{receipt_id}",
        **extra,
    }


def test_stream_entries_land_once_each_and_bad_ones_are_kept_with_their_payload():
    bench = Burst()
    for receipt_id in range(1, 6):
        bench.add_receipt(receipt_id)
        bench.xadd(entry(receipt_id))
    bench.xadd(entry(2))  # the adapter sends one again
    bench.xadd(entry(3, result_id="r-3"))  # and another with its own id
    bench.xadd("{not json")
    bench.xadd({"receipt_id": "seven", "brand": BRAND, "fiscal_id": "F-7"})
    bench.xadd(entry(9, brand="nobody-has-credentials"))

    bench.run()

    for receipt_id in range(1, 6):
        assert bench.api.patches(receipt_id) == [{"fiscal_id": f"F-{receipt_id}", "lock": True}]
    reasons = sorted((d["reason"], d["payload"]) for d in bench.dead_letters())
    assert reasons == [
        ("invalid_message", '{"receipt_id": "seven", "brand": "b1", "fiscal_id": "F-7"}'),
        ("invalid_message", "{not json"),
        ("unknown_brand", json.dumps(entry(9, brand="nobody-has-credentials"))),
    ]
    assert bench.stream_left() == 0  # every entry settled: acknowledged and deleted
    assert bench.unfinished() == 0


def test_the_dispatcher_keeps_the_queue_within_max_queued_and_the_rest_waits_due():
    bench = Burst(max_queued=3)
    for receipt_id in range(1, 21):
        bench.add_receipt(receipt_id)
        bench.send(receipt_id, f"F-{receipt_id}")

    for _ in range(5):  # no task runs: the queue fills to its bound and stays there
        bench.dispatcher.run_once()
    assert len(bench.queue) == 3
    assert bench.r.zcard(keys.SCHEDULE) == 20  # the others wait in the schedule, not lost

    bench.run()
    assert bench.deepest_queue <= 3
    assert all(len(bench.api.patches(r)) == 1 for r in range(1, 21))
    assert bench.unfinished() == 0


def test_the_dispatcher_tops_the_queue_up_in_batches_from_below_half():
    bench = Burst(limit=100_000, max_queued=10)  # every result has its slot now
    for receipt_id in range(1, 41):
        bench.add_receipt(receipt_id)
        bench.send(receipt_id, f"F-{receipt_id}")
    bench.dispatcher.run_once()
    assert len(bench.queue) == 10
    for _ in range(4):  # the workers take 4: 6 left, above half
        bench.queue.popleft()
    assert bench.dispatcher.run_once() == 0 and len(bench.queue) == 6  # no pass of one
    bench.queue.popleft()  # 5 left: half
    bench.dispatcher.run_once()
    assert len(bench.queue) == 10  # filled up in one pass


def test_a_backlog_past_the_budget_is_spread_over_windows_without_a_429():
    bench = Burst(limit=10, window=5)
    for receipt_id in range(1, 31):
        bench.add_receipt(receipt_id)
        bench.xadd(entry(receipt_id))
    started = bench.clock()

    bench.run()

    calls = [c for c in bench.api.calls if c.method in ("GET", "PATCH")]
    assert len(calls) == 60 and all(c.status == 200 for c in calls)
    for first in calls:  # no window of the budget ever saw more than its limit
        assert sum(first.at <= c.at < first.at + 5 for c in calls) <= 10
    assert bench.clock() - started >= 5 * (60 / 10 - 1)  # it took the windows it needed


def test_a_result_published_twice_runs_once_the_older_dispatch_is_stale():
    bench = Burst()
    bench.add_receipt(4)
    rid = bench.send(4, "F-4")
    bench.dispatcher.run_once()
    old = bench.queue.popleft()
    bench.clock.now += 200  # its queue lease (120 s) lapses: the dispatcher publishes it again
    bench.dispatcher.run_once()
    assert bench.queue and bench.queue[0][0] == rid and bench.queue[0][1] > old[1]

    bench.run()
    assert bench.fiscaliser.run(*old).kind == "gone"  # the old message arrives at last
    assert bench.api.patches(4) == [{"fiscal_id": "F-4", "lock": True}]


def test_a_record_without_a_brand_is_dead_lettered_and_does_not_stop_admission():
    bench = Burst()
    bench.add_receipt(5)
    damaged = bench.send(6, "F-6")
    bench.r.hset(keys.result(damaged), "brand", "")  # damaged in Redis, not by ingest
    bench.send(5, "F-5")

    bench.run()

    assert bench.api.patches(5) == [{"fiscal_id": "F-5", "lock": True}]
    assert [d["result_id"] for d in bench.dead_letters()] == [damaged]
    assert bench.unfinished() == 0


def test_a_failed_publish_pauses_the_dispatcher_and_the_results_are_re_driven():
    import pytest

    from worker.dispatcher import PublishFailed

    bench = Burst(limit=100_000)
    for receipt_id in (1, 2):
        bench.add_receipt(receipt_id)
        bench.send(receipt_id, f"F-{receipt_id}")
    working = bench.dispatcher.publish

    def broker_away(*_args):
        raise ConnectionError("broker away")

    bench.dispatcher.publish = broker_away
    with pytest.raises(PublishFailed):  # the loop pauses on it (worker/service.py)
        bench.dispatcher.run_once()
    assert not bench.queue and bench.unfinished() == 2  # still scheduled: nothing lost
    bench.dispatcher.publish = working
    bench.run()
    assert all(len(bench.api.patches(r)) == 1 for r in (1, 2))
