"""The exporter's figures: counted by the pipeline into Redis (worker/telemetry.py), served by
worker/metrics.py without walking the keyspace."""

from __future__ import annotations

import json
import time

import fakeredis
import httpx
import pytest
from burst import BRAND, STREAM, Burst
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker import keys, telemetry
from worker.clopos.wire import Wire
from worker.ingest_format import to_rfc3339
from worker.metrics import METRIC_NAMES, RedisStateCollector
from worker.settings import Settings


def scrape(r, **settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape, as Prometheus reads it."""
    registry = CollectorRegistry()
    registry.register(RedisStateCollector(r, Settings(ingest_stream=STREAM, **settings)))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def record(bench: Burst, receipt_id: int, **extra) -> str:
    """One result recorded due now, with the stream-id-shaped rid ingest gives it."""
    bench._seq += 1
    rid = f"{int(bench.clock() * 1000)}-{bench._seq}"
    result = {"receipt_id": receipt_id, "brand": BRAND, "fiscal_id": f"F-{receipt_id}", **extra}
    assert bench.store.create(
        rid, result, json.dumps(result), score=bench.clock(), now=bench.clock()
    )
    return rid


def test_a_run_moves_ingested_fiscalised_api_calls_token_refreshes_and_latency():
    bench = Burst()
    for receipt_id in (1, 2, 3):
        bench.add_receipt(receipt_id)
        bench.xadd({"receipt_id": receipt_id, "brand": BRAND, "fiscal_id": f"F-{receipt_id}"})
    bench.xadd({"receipt_id": 4, "brand": "nobody", "fiscal_id": "F-4"})
    bench.xadd("{broken")
    before = scrape(bench.r)
    assert value(before, "fiscal_results_ingested_total") == 0

    bench.run()

    after = scrape(bench.r)
    assert value(after, "fiscal_results_ingested_total") == 4  # the broken one is not a result
    assert value(after, "fiscal_results_fiscalised_total", how="patched") == 3
    assert value(after, "fiscal_results_dead_lettered_total", reason="unknown_brand") == 1
    assert value(after, "fiscal_results_dead_lettered_total", reason="invalid_message") == 1
    assert value(after, "fiscal_dead_letters", reason="invalid_message") == 1
    assert value(after, "fiscal_api_calls_total", endpoint="get_receipt", status="200") == 3
    assert value(after, "fiscal_api_calls_total", endpoint="patch_receipt", status="200") == 3
    assert value(after, "fiscal_api_calls_total", endpoint="auth", status="200") == 1
    assert value(after, "fiscal_token_refreshes_total", outcome="ok") == 1
    assert value(after, "fiscal_e2e_latency_seconds_count", since="stream") == 3
    assert value(after, "fiscal_e2e_latency_seconds_bucket", since="stream", le="+Inf") == 3


def test_latency_is_observed_from_the_stream_entry_and_from_printed_at_at_the_patch():
    bench = Burst()
    bench.add_receipt(1)
    bench.add_receipt(2)
    record(bench, 1, printed_at=to_rfc3339(bench.clock() - 40))  # printed 40 s before ingest
    record(bench, 2)  # no printed_at: observed from the stream entry only
    bench.clock.now += 7  # waited 7 s before a worker took them
    bench.run()

    samples = scrape(bench.r)
    stream = {"since": "stream"}
    assert value(samples, "fiscal_e2e_latency_seconds_count", **stream) == 2
    assert value(samples, "fiscal_e2e_latency_seconds_bucket", le="5.0", **stream) == 0
    assert value(samples, "fiscal_e2e_latency_seconds_bucket", le="10.0", **stream) == 2
    assert value(samples, "fiscal_e2e_latency_seconds_sum", **stream) == pytest.approx(14, abs=1)
    printed = {"since": "printed"}
    assert value(samples, "fiscal_e2e_latency_seconds_count", **printed) == 1
    assert value(samples, "fiscal_e2e_latency_seconds_bucket", le="30.0", **printed) == 0
    assert value(samples, "fiscal_e2e_latency_seconds_bucket", le="60.0", **printed) == 1


def test_buckets_are_cumulative_and_a_bound_holds_its_own_value():
    assert telemetry.bucket_of(0.25) == 0  # le="0.25" holds 0.25
    assert telemetry.bucket_of(0.26) == 1
    assert telemetry.bucket_of(10**6) == len(telemetry.LATENCY_BUCKETS)  # +Inf


def test_retries_are_counted_by_error_class_and_429_waits_in_seconds():
    bench = Burst()
    bench.add_receipt(1)
    bench.add_receipt(2, appear_after=5)  # not found at first: not_ready
    answers = {"1": [httpx.Response(503, json={"success": False, "error": "unavailable"}),
                     httpx.Response(429, json={"success": False, "error": "too_many_requests"},
                                    headers={"Retry-After": "3", "RateLimit-Reset": "3",
                                             "RateLimit-Remaining": "0"})]}  # fmt: skip

    def hook(api, request, receipt_id):
        queue = answers.get(str(receipt_id))
        return queue.pop(0) if queue and request.method == "GET" else None

    bench.api.hooks.append(hook)
    record(bench, 1)
    record(bench, 2)
    bench.run()

    samples = scrape(bench.r)
    assert value(samples, "fiscal_retries_total", error_class="transient") == 1
    assert value(samples, "fiscal_retries_total", error_class="rate_limited") == 1
    assert value(samples, "fiscal_retries_total", error_class="not_ready") >= 1
    assert value(samples, "fiscal_api_calls_total", endpoint="get_receipt", status="503") == 1
    assert value(samples, "fiscal_api_calls_total", endpoint="get_receipt", status="429") == 1
    assert value(samples, "fiscal_api_calls_total", endpoint="get_receipt", status="404") >= 1
    assert value(samples, "fiscal_rate_limit_wait_seconds_total", how="paused") == 3
    # every counter in the hash is an integer (the demo's report and others read them so)
    assert all(v.lstrip("-").isdigit() for v in bench.r.hgetall(keys.COUNTERS).values())
    assert value(samples, "fiscal_results_fiscalised_total", how="patched") == 2


def test_a_rejected_auth_counts_as_a_rejected_token_refresh():
    bench = Burst()
    bench.add_receipt(1)

    def refuse(api, request, receipt_id):
        if request.url.path.endswith("/v2/auth"):
            return httpx.Response(401, json={"success": False, "error": "unauthorized"})
        return None

    bench.api.hooks.append(refuse)
    record(bench, 1)
    bench.run(until=bench.clock() + 5)

    samples = scrape(bench.r)
    assert value(samples, "fiscal_token_refreshes_total", outcome="rejected") >= 1
    assert value(samples, "fiscal_token_refreshes_total", outcome="ok") == 0
    assert value(samples, "fiscal_api_calls_total", endpoint="auth", status="401") >= 1
    assert value(samples, "fiscal_retries_total", error_class="auth") >= 1


def test_ingest_lag_and_the_oldest_due_result_are_ages_in_seconds(r, monkeypatch):
    now = 1_700_000_100.0
    monkeypatch.setattr("worker.status.time.time", lambda: now)
    r.xadd(STREAM, {"data": "{}"}, id="1700000040000-0")  # 60 s old
    r.xadd(STREAM, {"data": "{}"}, id="1700000090000-0")
    r.zadd(keys.SCHEDULE, {"a": now - 25, "b": now + 100})

    samples = scrape(r)
    assert value(samples, "fiscal_ingest_lag_seconds") == pytest.approx(60)
    assert value(samples, "fiscal_results_oldest_due_seconds") == pytest.approx(25)
    assert value(samples, "fiscal_results_due") == 1
    assert value(samples, "fiscal_results_unfinished") == 2


def test_a_scrape_reads_brands_from_the_registry_and_never_scans_the_keyspace(r, monkeypatch):
    def no_scan(*args, **kwargs):
        raise AssertionError("a scrape must not walk the keyspace")

    monkeypatch.setattr(r, "scan", no_scan)
    monkeypatch.setattr(r, "scan_iter", no_scan)
    monkeypatch.setattr(r, "keys", no_scan)
    now = time.time()  # the breaker reads its own clock
    r.zadd(keys.BRANDS, {"alpha": now - 60, "gone": now - keys.BRAND_REGISTRY_SECONDS - 1})
    r.hset(
        keys.breaker("alpha"),
        mapping={keys.BREAKER_STATE: keys.BREAKER_OPEN, keys.BREAKER_UNTIL: now + 30},
    )

    samples = scrape(r)
    assert value(samples, "fiscal_brand_circuit_open", brand="alpha") == 1
    assert ("fiscal_brand_circuit_open", (("brand", "gone"),)) not in samples


def test_the_worker_heartbeat_registers_its_brands_and_forgets_stale_ones(r):
    from worker.service import WorkerService

    class Service:  # just what beat() reads
        brands = ["alpha", "beta"]
        held = staticmethod(lambda: [])
        consumer = type("C", (), {"consumer": "host:1"})()
        pulse = type("P", (), {"redis_answered": lambda self: None})()
        runtime = type(
            "R",
            (),
            {
                "settings": Settings(),
                "redis": r,
                "store": type("S", (), {"hold": lambda self, held, until: 0})(),
            },
        )()

    r.zadd(keys.BRANDS, {"old": 1.0})
    WorkerService.beat(Service())
    assert set(r.zrange(keys.BRANDS, 0, -1)) == {"alpha", "beta"}
    samples = scrape(r)
    assert value(samples, "fiscal_workers_alive") == 1
    assert value(samples, "fiscal_worker_heartbeat_age_seconds") < 5


def test_every_family_served_is_in_the_catalogue_and_the_catalogue_is_served(r):
    served = {name for name, _ in scrape(r)}
    r.zadd(keys.WORKERS, {"host:1": 1.0})
    served |= {name for name, _ in scrape(r)}
    families = set()
    for name in served:
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
                name = name.removesuffix(suffix)
        families.add(name)
    brand_families = {n for n in METRIC_NAMES if n.startswith("fiscal_brand_")}
    assert families == METRIC_NAMES - brand_families  # brand ones need a brand


def test_429_series_exist_from_zero_so_the_first_429_counts_in_a_rate(r):
    samples = scrape(r)
    for endpoint in ("auth", "get_receipt", "patch_receipt"):
        assert value(samples, "fiscal_api_calls_total", endpoint=endpoint, status="429") == 0


def test_a_stream_entry_that_is_not_utf8_does_not_break_the_scrape(r, monkeypatch):
    monkeypatch.setattr("worker.status.time.time", lambda: 1_700_000_100.0)
    raw = fakeredis.FakeRedis(connection_pool=r.connection_pool, decode_responses=False)
    raw.xadd(STREAM, {b"data": b"\xff\xfe not text"}, id="1700000040000-0")
    samples = scrape(r)
    assert value(samples, "fiscal_ingest_lag_seconds") == pytest.approx(60)


@pytest.mark.parametrize(
    ("state", "until_from_now", "blocks"),
    [
        ("open", 30, 1),  # cooling down: calls refused
        ("open", -10, 1),  # half-open, its probe to come
        ("open", -301, 0),  # half-open past the longest cool-down: no result left to probe
    ],
)
def test_the_circuit_gauge_says_whether_the_brand_is_blocked(r, state, until_from_now, blocks):
    now = time.time()  # the breaker reads its own clock
    r.zadd(keys.BRANDS, {"alpha": now})
    r.hset(
        keys.breaker("alpha"),
        mapping={keys.BREAKER_STATE: state, keys.BREAKER_UNTIL: now + until_from_now},
    )
    samples = scrape(r, breaker_max_cooldown_seconds=300)
    assert value(samples, "fiscal_brand_circuit_open", brand="alpha") == blocks


def test_a_failing_answer_hook_never_changes_what_the_request_did():
    def broken_hook(method, path, status):
        raise RuntimeError("metrics are down")

    wire = Wire(
        "https://clopos.test/open-api",
        http=httpx.Client(
            transport=httpx.MockTransport(
                lambda request: httpx.Response(200, json={"success": True, "data": {}})
            )
        ),
        on_answer=broken_hook,
    )
    answer = wire.send("PATCH", "/v2/receipts/1", json={"lock": True})
    assert getattr(answer, "status", None) == 200
