"""Worker memory while a large backlog waits out a Clopos outage.

    python bench/backlog_memory.py [--results 10000] [--concurrency 4]

The fake API answers 503 to every call of the brand; RESULTS results are queued. They are
parked in Redis (the schedule), not held by workers as ETA messages, so the worker's memory
(main process + pool, RSS) should stay flat whatever the backlog. Prints RSS at start, with
the backlog parked, and after a minute of the outage; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import BRAND, system

from worker import keys
from worker.testing import wait_for


def rss_mib(root_pid: int) -> tuple[float, float]:
    """Resident memory (MiB) of the worker's main process and of its pool children."""
    children = Path(f"/proc/{root_pid}/task/{root_pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []

    def rss(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    return rss(root_pid), sum(rss(k) for k in kids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--minutes", type=int, default=2, help="how long the outage is watched")
    args = parser.parse_args()
    with system() as running:
        running.fake.fail_brand(BRAND, 503)  # an outage until the end of the run
        worker = running.start_worker("w", args.concurrency)
        assert worker.process is not None
        pid = worker.process.pid
        fake = running.fake
        r = running.server.client()
        idle = rss_mib(pid)
        started = time.time()
        pipe = r.pipeline(transaction=False)
        for rid in range(1, args.results + 1):
            payload = {"receipt_id": rid, "brand": BRAND, "fiscal_id": f"F-{rid}"}
            pipe.xadd("fiscal:results", {"data": json.dumps(payload)})
        pipe.execute()
        wait_for(
            lambda: (
                r.xlen("fiscal:results") == 0
                and r.zcard(keys.SCHEDULE) == args.results
                and r.llen("fiscal") == 0
            ),
            timeout=600,
            interval=0.5,
            what="backlog ingested and parked",
        )
        parked_after = time.time() - started
        series = [("parked", rss_mib(pid), 0)]
        for i in range(1, args.minutes * 4 + 1):
            time.sleep(15)  # measuring: the outage goes on, results cycle through parking
            runs = int(r.hget(keys.COUNTERS, "retries_scheduled") or 0)
            series.append((f"+{15 * i}s", rss_mib(pid), runs))
        stats = fake.stats()
        print(f"backlog           {args.results} results, brand answering 503 throughout")
        print(f"ingested+parked   in {parked_after:.1f} s; in Redis: {r.zcard(keys.SCHEDULE)}")
        print(f"worker RSS (MiB)  main + pool; idle {idle[0]:.1f} + {idle[1]:.1f}")
        for label, (main_rss, pool_rss), runs in series:
            print(f"  {label:<8} {main_rss:6.1f} + {pool_rss:6.1f}   parkings so far {runs}")
        print(f"calls to Clopos   {sum(stats['requests'].values())} (circuit breaker open)")
        print(f"celery queue      {r.llen('fiscal')} messages; nothing waits in worker memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
