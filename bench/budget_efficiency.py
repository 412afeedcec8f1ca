"""Figure 2: budget efficiency, the calls a brand's backlog gets per window against its budget.

    .venv/bin/python bench/budget_efficiency.py [--runs 3] [--limit 40] [--window 5]
                                                [--windows 4] [--workers 4]

One Stack (bench/common.py): a private Redis, the stand-in API enforcing a per-brand budget
of LIMIT calls per WINDOW seconds (a call over it gets 429, counted), and WORKERS
fiscal-worker processes (concurrency 2) configured with the same budget
(FISCAL_RATE_LIMIT_REQUESTS / _WINDOW_SECONDS, the default margin). Each run gives a fresh
brand a backlog of WINDOWS windows' worth of results (LIMIT * WINDOWS / 2: a GET and a PATCH
each), submitted at once, and reads the stand-in's request log of that brand: the calls it
answered in each WINDOW-second window from the brand's first call, the first and the last
(partial) windows left out.

    efficiency = calls in the full windows / (full windows * LIMIT)    target >= 0.97, 0 429s

Also reported: per run the 429s and the drain time against the ideal (calls / budget); and
the worker's own plan, the calls per window its reservation script spaces a brand's slots
for with the default margin (FISCAL_RATE_LIMIT_MARGIN): the ceiling of the figure.
Correctness: every result PATCHed exactly once with its fiscal id and lock, nothing left
scheduled or dead-lettered; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

if __package__ in (None, ""):  # run as a script: python bench/budget_efficiency.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Key, Stack, check_landed, patch_counts, stored_receipts, summary
from worker.ratelimit import CALLS_PER_RESULT, MARGIN, BrandBudget, RatePolicy

NAME = "budget_efficiency"
TARGET = 0.97
LIMIT = 40  # calls per window and brand
WINDOW = 5.0  # seconds (the example is 10 s; 5 s fits the suite's time budget)
WINDOWS = 4  # the backlog, in windows of calls
WORKERS = 4
CONCURRENCY = 2
PLAN_PROBE = "plan-probe"  # a brand only `planned` reserves for


def planned(redis_client: redis.Redis, limit: int, window: float) -> int:
    """The calls per window the worker plans with this budget and the default margin: its
    own reservation script asked once, for a brand no one uses (window / slot interval)."""
    policy = RatePolicy(limit=limit, window=window, margin=MARGIN)
    reservation = BrandBudget(redis_client, policy).reserve(PLAN_PROBE, 1)
    return round(window / reservation.step)


def stop_workers(stack: Stack) -> None:
    """Warm-stop every worker at once (one takes ~3 s, most of it Celery's own shutdown)."""
    with ThreadPoolExecutor(max(1, len(stack.workers))) as pool:
        list(pool.map(lambda worker: worker.stop(), stack.workers))
    stack.stop_workers()


def window_counts(calls: list[float], window: float) -> list[int]:
    """Calls per window from the first call, the first and the last window left out."""
    if not calls:
        return []
    first = calls[0]
    per_window = Counter(int((t - first) // window) for t in calls)
    return [per_window[i] for i in range(1, max(per_window))]


def one_run(
    stack: Stack, brand: str, results: int, limit: int, window: float, landed: dict[Key, str]
) -> dict[str, Any]:
    run = {(brand, rid): f"F{rid}-{brand}" for rid in range(1, results + 1)}
    landed.update(run)
    ideal = CALLS_PER_RESULT * results / (limit / window)
    started = time.time()
    stack.submit(run)
    stats = stack.wait_landed(landed, timeout=3 * ideal + 30)
    check_landed(patch_counts(stats), landed, stored=stored_receipts(stats))
    calls = sorted(  # the budget's calls: receipt calls answered (auth is not counted)
        t
        for t, method, b, _, status in stats["request_log"]
        if b == brand and method in ("GET", "PATCH") and status != 429
    )
    drain = calls[-1] - started
    full = window_counts(calls, window)
    return {
        "efficiency": sum(full) / (len(full) * limit) if full else float("nan"),
        "calls_per_full_window": full,
        "calls": len(calls),
        "rate_limited_429": int(stats["rate_limited"].get(brand, 0)),
        "drain_seconds": round(drain, 2),
        "ideal_seconds": round(ideal, 2),
    }


def measure(
    runs: int = 3,
    limit: int = LIMIT,
    window: float = WINDOW,
    windows: int = WINDOWS,
    workers: int = WORKERS,
    quick: bool = False,
) -> dict[str, Any]:
    """`quick`: a backlog of 3 windows (2 full ones measured), to try the harness."""
    started = time.monotonic()
    windows = min(windows, 3) if quick else windows
    results = limit * windows // CALLS_PER_RESULT
    brands = tuple(f"backlog-{i + 1}" for i in range(runs))  # a fresh budget per run
    budget = {
        "FISCAL_RATE_LIMIT_REQUESTS": str(limit),
        "FISCAL_RATE_LIMIT_WINDOW_SECONDS": str(window),
    }
    landed: dict[Key, str] = {}
    with Stack(brands=brands, rate_limit=limit, rate_window=window, settings=budget) as stack:
        for i in range(workers):
            stack.start_worker(f"w{i}", concurrency=CONCURRENCY)
        per_run = [one_run(stack, brand, results, limit, window, landed) for brand in brands]
        stack.check_finished()
        stop_workers(stack)
        plan = planned(stack.redis, limit, window)
    efficiency = summary(r["efficiency"] for r in per_run)
    rejected = sum(r["rate_limited_429"] for r in per_run)
    return {
        "figure": NAME,
        "target": f">= {TARGET}, 0 429s",
        "value": efficiency["median"],
        "unit": "calls per window / budget",
        "met": efficiency["median"] >= TARGET and rejected == 0,
        **efficiency,
        "details": {
            "budget": f"{limit} calls / {window:g} s per brand",
            "backlog_results": results,
            "fleet": f"{workers} worker processes x concurrency {CONCURRENCY}",
            "planned_per_window": plan,
            "planned_efficiency": plan / limit,
            "rate_limited_429": rejected,
            "per_run": per_run,
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--window", type=float, default=WINDOW)
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args()
    result = measure(args.runs, args.limit, args.window, args.windows, args.workers)
    print(json.dumps(result, indent=2))
    details = result["details"]
    print(
        f"efficiency median {result['median']:.3f} (min {result['min']:.3f}, max "
        f"{result['max']:.3f}), 429s {details['rate_limited_429']}; the worker plans "
        f"{details['planned_efficiency']:.3f}; target {result['target']}: "
        f"{'met' if result['met'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
