"""Figure 6: worker memory while a 10,000-result backlog waits out a Clopos outage.

    .venv/bin/python bench/backlog_memory.py [--runs 3] [--results 10000] [--hold 5]

Each run: a fresh private Redis (no persistence), the project's fake Clopos API
(worker.fake_clopos: the stand-in has no outages) answering 503 to every call of one brand,
and one fiscal-worker process (concurrency 4, the deployment's default). The worker first
fiscalises results of another, healthy brand until every pool child has made calls (a
child's first task costs it ~7 MiB: the Clopos client, lazy imports; a worker in service
has paid that long ago), then its RSS is read (the main process plus its pool children,
/proc): "idle". RESULTS results of the failing brand are XADDed; the worker ingests them,
their first calls fail, the circuit opens, and they are parked in Redis (the schedule) for
their retry, not held by the worker (the Celery queue stays empty). The RSS is read every
half second from then on, until HOLD seconds of the outage after the backlog is parked.

    growth = peak RSS (main + pool) from the XADD to the end of the hold - RSS idle
                                                             target <= 20 MB (10^6 bytes)

Also reported: the growth from the worker's RSS before the warm-up ("cold", the first
tasks' cost included). The runs go one after the other, each on its own Redis, fake and
worker: a pool child's RSS grows with every task it runs (until it is recycled,
worker/app.py), so a run slowed down by others (a longer ingest, more retries) would grow
more. The worker is killed at the end of a run (nothing is checked after).
Correctness: every result of the failing brand still in the schedule, none PATCHed, none
dead-lettered, the stream empty; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/backlog_memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import ROOT, STREAM, Incorrect, summary
from worker import keys
from worker.fake_clopos import FakeClopos
from worker.testing import (
    RedisServer,
    WorkerProcess,
    start_fake_clopos,
    wait_for,
    worker_env,
    write_credentials,
)

NAME = "memory"
TARGET_MB = 20.0
RESULTS = 10_000
HOLD = 5.0  # seconds of the outage watched once the backlog is parked
SAMPLE = 0.5  # seconds between RSS readings
CONCURRENCY = 4
BRAND = "outage"
WARM_UP_BRAND = "healthy"
WARM_UP_RESULTS = 8  # per round
WARM_UP_ROUNDS = 5
WARM_UP_LATENCY = 0.5  # seconds per call, so that the warm-up's tasks overlap
INTEGRATOR = "bench-integrator"


def mib(rss: tuple[int, int]) -> dict[str, float]:
    return {"main": round(rss[0] / 2**20, 1), "pool": round(rss[1] / 2**20, 1)}


def rss_bytes(root_pid: int) -> tuple[int, int]:
    """Resident memory (bytes) of the worker's main process and of its pool children."""
    children = Path(f"/proc/{root_pid}/task/{root_pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []

    def rss(pid: int) -> int:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except FileNotFoundError:  # a pool child being replaced
            return 0
        for line in lines:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    return rss(root_pid), sum(rss(k) for k in kids)


def warm_up(r: redis.Redis, fake: FakeClopos, worker: WorkerProcess) -> None:
    """Results of a healthy brand until every pool child has made a call: a child's first
    task costs it ~7 MiB (the Clopos client, lazy imports), whatever the backlog."""
    for round_ in range(WARM_UP_ROUNDS):
        receipts = range(1 + round_ * WARM_UP_RESULTS, 1 + (round_ + 1) * WARM_UP_RESULTS)
        for rid in receipts:
            entry = {"receipt_id": rid, "brand": WARM_UP_BRAND, "fiscal_id": f"W{rid}"}
            r.xadd(STREAM, {"data": json.dumps(entry)})
        wait_for(
            lambda rs=receipts: all(fake.receipt(WARM_UP_BRAND, i)["lock"] for i in rs),
            timeout=30,
            what="warm-up results fiscalised",
        )
        callers = set(re.findall(r"ForkPoolWorker-(\d+)\] event=result_fiscalised", worker.log()))
        if len(callers) >= CONCURRENCY:
            return
    raise RuntimeError(f"warm-up: only pool children {sorted(callers)} made calls")


def one_run(results: int, hold: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fw-bench-memory-") as tmp:
        directory = Path(tmp)
        server = RedisServer(directory, secrets.token_urlsafe(16), persistent=False)
        server.start()
        creds = {b: (f"client-{b}", secrets.token_hex(8)) for b in (BRAND, WARM_UP_BRAND)}
        fake = start_fake_clopos(creds, integrator_id=INTEGRATOR)
        for rid in range(1, WARM_UP_ROUNDS * WARM_UP_RESULTS + 1):
            fake.add_receipt(WARM_UP_BRAND, {"id": rid})
        worker = WorkerProcess(
            worker_env(
                redis_url=server.url,
                clopos_url=str(fake.base_url),
                integrator_id=INTEGRATOR,
                credentials_file=write_credentials(directory / "creds.json", creds),
                settings={"FISCAL_HEALTH_FILE": str(directory / "health.json")},
            ),
            directory / "worker.log",
            name="w0",
            concurrency=CONCURRENCY,
            cwd=ROOT,
        )
        try:
            fake.fail_brand(BRAND, 503)  # an outage until the end of the run
            fake.set_latency(WARM_UP_LATENCY, brand=WARM_UP_BRAND)  # tasks overlap
            worker.start()
            assert worker.pid is not None
            r = server.client()
            time.sleep(1.0)  # settled: the pool forked, the loops running
            cold = rss_bytes(worker.pid)
            warm_up(r, fake, worker)
            time.sleep(1.0)
            idle = rss_bytes(worker.pid)
            pipe = r.pipeline(transaction=False)
            for rid in range(1, results + 1):
                entry = {"receipt_id": rid, "brand": BRAND, "fiscal_id": f"F{rid}"}
                pipe.xadd(STREAM, {"data": json.dumps(entry)})
            pipe.execute()
            samples = []
            started = time.monotonic()
            while r.xlen(STREAM) or r.zcard(keys.SCHEDULE) < results:
                if time.monotonic() - started > 120:
                    raise Incorrect("the backlog was not ingested and parked in 120 s")
                samples.append(rss_bytes(worker.pid))
                time.sleep(SAMPLE)
            parked = time.monotonic() - started
            hold_until = time.monotonic() + hold
            while time.monotonic() < hold_until:
                samples.append(rss_bytes(worker.pid))
                time.sleep(SAMPLE)
            samples.append(end := rss_bytes(worker.pid))
            scheduled, queued = r.zcard(keys.SCHEDULE), r.llen(keys.CELERY_QUEUE)
            dead, left = r.zcard(keys.DLQ_INDEX), r.xlen(STREAM)
            retries = int(r.hget(keys.COUNTERS, "retries_scheduled") or 0)
            stats = fake.stats()
        finally:
            worker.kill()
            fake.stop()
            server.stop()
    patched = sum(
        entry["patch_ok"] for key, entry in stats["receipts"].items() if key.startswith(BRAND)
    )
    if scheduled != results or dead or left or patched:
        raise Incorrect(
            f"{scheduled} of {results} parked, {dead} dead-lettered, {left} left in the "
            f"stream, {patched} PATCHed during an outage"
        )
    peak = max(samples, key=sum)
    return {
        "growth_mb": (sum(peak) - sum(idle)) / 1e6,
        "end_growth_mb": round((sum(end) - sum(idle)) / 1e6, 2),
        "growth_from_cold_mb": round((sum(peak) - sum(cold)) / 1e6, 2),
        "cold_mib": mib(cold),
        "idle_mib": mib(idle),
        "peak_mib": mib(peak),
        "ingested_and_parked_seconds": round(parked, 1),
        "celery_queue": queued,
        "calls_to_clopos": stats["requests"].get(BRAND, 0),
        "retries_scheduled": retries,
    }


def measure(
    runs: int = 3, results: int = RESULTS, hold: float = HOLD, quick: bool = False
) -> dict[str, Any]:
    """`quick`: a 2,000-result backlog watched for 2 s, to try the harness."""
    started = time.monotonic()
    if quick:
        results, hold = min(results, 2_000), min(hold, 2.0)
    per_run = [one_run(results, hold) for _ in range(runs)]
    growth = summary(run["growth_mb"] for run in per_run)
    return {
        "figure": NAME,
        "target": f"RSS growth <= {TARGET_MB:g} MB",
        "value": growth["median"],
        "unit": "MB (peak RSS, main + pool, minus idle)",
        "met": growth["median"] <= TARGET_MB,
        **growth,
        "details": {
            "setup": (
                f"{results} results of one brand answering 503, parked for retry; one "
                f"worker process x concurrency {CONCURRENCY}, warmed up on another brand; "
                f"RSS watched until {hold:g} s after the backlog was parked"
            ),
            "per_run": per_run,
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=int, default=RESULTS)
    parser.add_argument("--hold", type=float, default=HOLD, help="seconds watched once parked")
    args = parser.parse_args()
    result = measure(args.runs, args.results, args.hold)
    print(json.dumps(result, indent=2))
    print(
        f"RSS growth: median {result['median']:.1f} MB (min {result['min']:.1f}, max "
        f"{result['max']:.1f}); target {result['target']}: "
        f"{'met' if result['met'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
