"""How long one Prometheus scrape takes with a million audit keys in Redis.

A private redis-server is filled like a deployment that ran for months: 1,000,000 audit
records and 1,000,000 fiscalised markers (what grows with every receipt), 20 brands with
rate-budget and breaker state, a dead-letter store, counters and a latency histogram.
Then the exporter's collection plus the text rendering (what one scrape does, without the
HTTP hop) runs REPEATS times against it, and the same with the old brand discovery (two
SCANs of the keyspace per scrape) as the baseline, in the same process and Redis.

    .venv/bin/python bench/scrape.py [--keys 1000000] [--repeats 20]

Prints the median and worst scrape of each and their ratio. The target: < 100 ms.
Figure 7 of the suite (bench/dlq_scale.py) fills its Redis with `fill` and times the scrape
with `time_scrapes`, beside the dead-letter store at scale.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, generate_latest

from worker import keys, status, telemetry
from worker.metrics import RedisStateCollector
from worker.settings import Settings
from worker.testing import RedisServer

BRANDS = [f"brand{i:02d}" for i in range(20)]
FILL = """
local prefix, first, last = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = first, last do
  local brand = 'brand' .. string.format('%02d', i % 20)
  local tag = 'fw:{b:' .. brand .. '}:'
  redis.call('HSET', tag .. 'audit:' .. i, 'state', 'fiscalised', 'fiscal_id', 'F-' .. i)
  redis.call('SET', tag .. 'fiscalised:' .. i, 'F-' .. i)
end
return last - first + 1
"""


def fill(r: redis.Redis, receipts: int) -> None:
    script = r.register_script(FILL)
    batch = 50_000
    for first in range(0, receipts, batch):
        script(args=["fw", first, min(receipts, first + batch) - 1])
    now = time.time()
    for brand in BRANDS:
        r.set(keys.rate_tat(brand), now)
        r.hset(keys.breaker(brand), mapping={keys.BREAKER_STATE: "closed", "failures": 0})
    r.zadd(keys.BRANDS, dict.fromkeys(BRANDS, now))
    r.hset(
        keys.COUNTERS,
        mapping={telemetry.RECEIVED: receipts, telemetry.api_call("get_receipt", 200): receipts},
    )
    r.hset(keys.LATENCY, mapping={"stream:3": receipts, "stream:sum": receipts * 2.0})


def scanning_brands(registered: list[str], settings: Settings, r: redis.Redis) -> list[str]:
    """The brand discovery of the previous version: SCAN twice per scrape (the baseline)."""
    found = set(registered)
    for pattern in (keys.rate_tat("*"), keys.breaker("*")):
        for key in r.scan_iter(match=pattern, count=500):
            brand = keys.brand_of(key)
            if brand:
                found.add(brand)
    return sorted(found)


def time_scrapes(registry: CollectorRegistry, repeats: int) -> list[float]:
    took = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate_latest(registry)
        took.append(time.perf_counter() - started)
    return took


def run(receipts: int, repeats: int, baseline_repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fw-scrape-") as folder:
        server = RedisServer(Path(folder), persistent=False, detached=True)
        server.start()
        try:
            r = server.client()
            started = time.perf_counter()
            fill(r, receipts)
            print(f"filled {r.dbsize():,} keys in {time.perf_counter() - started:.1f} s")
            settings = Settings(redis_url=server.url)
            registry = CollectorRegistry()
            registry.register(RedisStateCollector(r, settings))
            now = time_scrapes(registry, repeats)
            original: Callable[..., list[str]] = status.known_brands
            status.known_brands = lambda registered, s: scanning_brands(registered, s, r)
            try:
                before = time_scrapes(registry, baseline_repeats)
            finally:
                status.known_brands = original
        finally:
            server.stop()
    for name, took in (("brand registry (now)", now), ("SCAN per scrape (before)", before)):
        print(
            f"{name:26s} median {statistics.median(took) * 1e3:8.1f} ms, "
            f"worst {max(took) * 1e3:8.1f} ms over {len(took)} scrapes"
        )
    ratio = statistics.median(before) / statistics.median(now)
    print(f"the registry's scrape is {ratio:.0f}x faster; target < 100 ms: "
          f"{'met' if max(now) < 0.1 else 'NOT met'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="audit records to fill")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.keys, args.repeats, args.baseline_repeats)


if __name__ == "__main__":
    main()
