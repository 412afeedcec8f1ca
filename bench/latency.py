"""Figure 4: the worker's own latency under light load, stream entry -> PATCH.

    .venv/bin/python bench/latency.py [--runs 3] [--results 100] [--rate 10]

One Stack (bench/common.py): a private Redis, the stand-in API answering every receipt
call after LATENCY (20 ms), a budget far above the load, and 2 fiscal-worker processes
(concurrency 4, the deployment's default). One warm-up result first (the brand's token and
the connections: cold start is figure 5), then each run XADDs RESULTS results at RATE per
second, one entry at a time, and takes per result

    overhead = (PATCH answered at the API) - (stream entry added) - 2 x LATENCY

from the stand-in's request log (its PATCH time) and the entry id's milliseconds (Redis'
clock, the same machine): what the worker adds to a GET and a PATCH, whatever its own
histogram says. p50 / p95 / p99 per run; the headline is the p99 (median of the runs),
target <= 50 ms. Correctness: every result PATCHed exactly once with its fiscal id and
lock, nothing left scheduled or dead-lettered; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/latency.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    FAR_BUDGET,
    STREAM,
    Incorrect,
    Key,
    Stack,
    check_landed,
    patch_counts,
    stored_receipts,
    summary,
)
from worker.telemetry import entry_time

NAME = "latency"
TARGET = 0.050  # p99 overhead, seconds
LATENCY = 0.020  # the API's, per call
CALLS = 2  # GET + PATCH
RESULTS = 100  # per run
RATE = 10.0  # results per second
WORKERS = 2
CONCURRENCY = 4
BRAND = "light"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks."""
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def submit_paced(stack: Stack, first: int, count: int, rate: float) -> dict[int, float]:
    """XADD `count` results of receipts first.. at `rate` a second; {receipt: entry time}."""
    added: dict[int, float] = {}
    started = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        rid = first + i
        entry = {"receipt_id": rid, "brand": BRAND, "fiscal_id": f"F{rid}"}
        entry_id = stack.redis.xadd(STREAM, {"data": json.dumps(entry)})
        added[rid] = entry_time(entry_id) or 0.0
    return added


def patch_times(stats: dict[str, Any]) -> dict[int, float]:
    """The time of each receipt's (first) answered PATCH, from the stand-in's request log."""
    times: dict[int, float] = {}
    for t, method, brand, rid, status in stats["request_log"]:
        if method == "PATCH" and brand == BRAND and status == 200:
            times.setdefault(int(rid), t)
    return times


def measure(
    runs: int = 3, results: int = RESULTS, rate: float = RATE, quick: bool = False
) -> dict[str, Any]:
    """`quick`: 30 results per run, to try the harness."""
    started = time.monotonic()
    results = min(results, 30) if quick else results
    landed: dict[Key, str] = {}
    added: dict[int, float] = {}
    batches: list[list[int]] = []
    with Stack(brands=(BRAND,), latency=LATENCY, settings=FAR_BUDGET) as stack:
        for i in range(WORKERS):
            stack.start_worker(f"w{i}", concurrency=CONCURRENCY)
        added.update(submit_paced(stack, 1, 1, rate))  # warm-up: token, connections
        landed[(BRAND, 1)] = "F1"
        stack.wait_landed(landed, timeout=30)
        for run in range(runs):
            first = 2 + run * results
            batch = submit_paced(stack, first, results, rate)
            added.update(batch)
            batches.append(sorted(batch))
            landed.update({(BRAND, rid): f"F{rid}" for rid in batch})
        stats = stack.wait_landed(landed, timeout=60)
        check_landed(patch_counts(stats), landed, stored=stored_receipts(stats))
        stack.check_finished()
        with ThreadPoolExecutor(WORKERS) as pool:  # warm shutdowns at once (~3 s each)
            list(pool.map(lambda worker: worker.stop(), stack.workers))
    patched = patch_times(stats)
    per_run = []
    for batch in batches:
        overhead = [patched[rid] - added[rid] - CALLS * LATENCY for rid in batch]
        if min(overhead) < -0.005:  # the clocks cannot disagree: one machine
            raise Incorrect("a PATCH before its stream entry")
        per_run.append({f"p{q}": percentile(overhead, q) for q in (50, 95, 99)})
    figures = {q: summary(run[q] for run in per_run) for q in ("p50", "p95", "p99")}
    p99 = figures["p99"]
    details: dict[str, Any] = {
        "p50": {"target": "for information", "unit": "s", **figures["p50"]},
        "p95": {"target": "for information", "unit": "s", **figures["p95"]},
        "p99": {"target": "<= 50 ms", "unit": "s", **p99, "met": p99["median"] <= TARGET},
        "load": f"{rate:g} results/s, {results} per run, API latency {LATENCY * 1e3:.0f} ms",
        "fleet": f"{WORKERS} worker processes x concurrency {CONCURRENCY}",
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    return {
        "figure": NAME,
        "target": "p99 overhead <= 50 ms",
        "value": p99["median"],
        "unit": "s (p99 of entry -> PATCH minus the API's 2 x 20 ms)",
        "met": details["p99"]["met"],
        **p99,
        "details": details,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=int, default=RESULTS)
    parser.add_argument("--rate", type=float, default=RATE)
    args = parser.parse_args()
    result = measure(args.runs, args.results, args.rate)
    print(json.dumps(result, indent=2))
    for q in ("p50", "p95", "p99"):
        fig = result["details"][q]
        print(
            f"overhead {q}: median {fig['median'] * 1e3:6.1f} ms (min {fig['min'] * 1e3:.1f}, "
            f"max {fig['max'] * 1e3:.1f}); target {fig['target']}"
        )
    print(f"target {result['target']}: {'met' if result['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
