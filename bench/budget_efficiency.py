"""Budget efficiency: achieved calls per window / configured budget, one brand, a backlog.

    python bench/budget_efficiency.py [--limit 60] [--window 5] [--results 200] [--workers 4]

Starts a private redis-server, the fake Clopos API (enforcing the same budget) and N real
`celery worker` processes, queues a backlog of closed receipts for one brand, and reads the
fake's request log: calls per full window while the backlog drains (the first and the last,
partial, windows left out), 429s, and the drain time against the ideal (calls / budget).
Target: efficiency >= 0.95 with zero 429s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from harness import BRAND, system

from worker.testing import wait_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--results", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    receipts = range(1, args.results + 1)
    with system(rate_limit=args.limit, rate_window=args.window) as running:
        for i in range(args.workers):
            running.start_worker(
                f"w{i}",
                args.concurrency,
                FISCAL_RATE_LIMIT_REQUESTS=str(args.limit),
                FISCAL_RATE_LIMIT_WINDOW_SECONDS=str(args.window),
            )
        fake, r = running.fake, running.server.client()
        for rid in receipts:
            fake.add_receipt(BRAND, {"id": rid, "status": 2, "closed_at": "2026-11-27 12:00:00"})
        started = time.time()
        for rid in receipts:
            payload = {"receipt_id": rid, "brand": BRAND, "fiscal_id": f"F-{rid}"}
            r.xadd("fiscal:results", {"data": json.dumps(payload)})
        ideal = 2 * args.results / (args.limit / args.window)
        wait_for(
            lambda: all(fake.receipt(BRAND, i)["lock"] for i in receipts),
            timeout=ideal * 3 + 60,
            interval=0.2,
            what="backlog drained",
        )
        report(fake.stats(), args, time.time() - started, ideal)
    return 0


def report(stats: dict, args: argparse.Namespace, drain: float, ideal: float) -> None:
    log = [row for row in stats["request_log"] if row[2] == BRAND]
    calls = sorted(t for t, _method, _brand, _receipt, status in log if status != 429)
    first = calls[0]
    per_window = Counter(int((t - first) // args.window) for t in calls)
    full = [per_window[i] for i in range(1, max(per_window))]  # drop the first and the last
    efficiency = sum(full) / (len(full) * args.limit) if full else float("nan")
    rejected = stats["rate_limited"].get(BRAND, 0)
    lines = [
        ("budget", f"{args.limit} calls / {args.window:g} s, one brand, {args.results} results"),
        ("fleet", f"{args.workers} worker processes x concurrency {args.concurrency}"),
        ("calls", f"{len(calls)} (GET + PATCH per result), 429s: {rejected}"),
        ("calls per window", f"{full}  (full windows only)"),
        ("efficiency", f"{efficiency:.3f}  (calls per window / budget; target >= 0.95)"),
        ("drain", f"{drain:.1f} s, ideal {ideal:.1f} s, ratio {drain / ideal:.3f}"),
    ]
    for name, value in lines:
        print(f"{name:<18}{value}")
    if os.environ.get("BENCH_DEBUG"):  # the calls around each 429
        for i, row in enumerate(log):
            if row[4] == 429:
                for t, method, _brand, receipt, status in log[max(0, i - 62) : i + 3]:
                    print(f"{t - first:9.4f} {method:5} {receipt} {status}")


if __name__ == "__main__":
    sys.exit(main())
