"""Figure 5: cold start, 50 brands without a cached token each get their first PATCH.

    .venv/bin/python bench/cold_start.py [--runs 3] [--brands 50]

Each run is its own Stack (bench/common.py): a fresh Redis (no token cached, an empty auth
budget) and a fresh stand-in API, which allows 60 /v2/auth calls per 60 s per client IP as
Clopos does (a call over it gets 429, counted under "_auth"), with 2 fiscal-worker processes
(concurrency 4) and their default settings (the auth pace FISCAL_AUTH_CALLS_PER_MINUTE).
Once the workers are up, one result per brand is XADDed at once; the figure is the time
from that XADD until the last brand's first PATCH is answered (the stand-in's request log),
target <= 70 s with 0 auth 429s. The runs go side by side, each on its own Redis, stand-in
and workers: a run is mostly waiting on the auth pace, and one after the other they would
take three times as long. Correctness: every result PATCHed exactly once with its fiscal
id and lock, nothing left scheduled or dead-lettered; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/cold_start.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Incorrect, Stack, check_landed, patch_counts, stored_receipts, summary

NAME = "cold_start"
TARGET = 70.0  # seconds
BRANDS = 50
AUTH_LIMIT = 60  # per client IP per 60 s, Clopos' (the stand-in's window is 60 s)
WORKERS = 2
CONCURRENCY = 4
TIMEOUT = 300.0  # seconds a run may take before it counts as lost


def one_run(brands: int) -> dict[str, Any]:
    names = tuple(f"cold-{i:02d}" for i in range(1, brands + 1))
    with Stack(brands=names, auth_limit=AUTH_LIMIT) as stack:
        for i in range(WORKERS):
            stack.start_worker(f"w{i}", concurrency=CONCURRENCY)
        stack.wait_idle()
        expected = {(brand, 1): f"F1-{brand}" for brand in names}
        started = time.time()
        stack.submit(expected)
        stats = stack.wait_landed(expected, timeout=TIMEOUT)
        check_landed(patch_counts(stats), expected, stored=stored_receipts(stats))
        stack.check_finished()
        with ThreadPoolExecutor(WORKERS) as pool:  # warm shutdowns at once (~3 s each)
            list(pool.map(lambda worker: worker.stop(), stack.workers))
    first_patch: dict[str, float] = {}
    auth_times = []
    for t, method, brand, _, status in stats["request_log"]:
        if method == "PATCH" and status == 200:
            first_patch.setdefault(brand, t)
        elif method == "POST":
            auth_times.append(t)
    if len(first_patch) != brands:
        raise Incorrect(f"{len(first_patch)} of {brands} brands got a PATCH")
    landed = sorted(t - started for t in first_patch.values())
    return {
        "seconds": landed[-1],
        "half_of_brands_seconds": round(landed[len(landed) // 2], 2),
        "auth_calls": len(auth_times),
        "auth_429": int(stats["rate_limited"].get("_auth", 0)),
        "auth_calls_first_60s": sum(1 for t in auth_times if t - started < 60),
    }


def measure(runs: int = 3, brands: int = BRANDS, quick: bool = False) -> dict[str, Any]:
    """`quick`: 10 brands, to try the harness."""
    started = time.monotonic()
    brands = min(brands, 10) if quick else brands
    with ThreadPoolExecutor(runs) as pool:
        per_run = list(pool.map(one_run, [brands] * runs))
    seconds = summary(run["seconds"] for run in per_run)
    auth_429 = sum(run["auth_429"] for run in per_run)
    return {
        "figure": NAME,
        "target": f"<= {TARGET:g} s, 0 auth 429s",
        "value": seconds["median"],
        "unit": f"s (XADD -> every brand's first PATCH, {brands} brands)",
        "met": seconds["median"] <= TARGET and auth_429 == 0,
        **seconds,
        "details": {
            "auth_429": auth_429,
            "per_run": per_run,
            "setup": (
                f"{brands} brands, one result each, no cached token; auth limit "
                f"{AUTH_LIMIT}/60 s per IP; {runs} runs side by side, each its own Redis, "
                "stand-in and workers"
            ),
            "fleet": f"{WORKERS} worker processes x concurrency {CONCURRENCY} per run",
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--brands", type=int, default=BRANDS)
    args = parser.parse_args()
    result = measure(args.runs, args.brands)
    print(json.dumps(result, indent=2))
    print(
        f"cold start: median {result['median']:.1f} s (min {result['min']:.1f}, max "
        f"{result['max']:.1f}), auth 429s {result['details']['auth_429']}; target "
        f"{result['target']}: {'met' if result['met'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
