"""Figure 1, throughput against bare Celery, and figure 8, scale-out.

    .venv/bin/python bench/throughput.py [--runs 3] [--figure throughput|scale_out] [--quick]

throughput_ratio: for each row (pool x concurrency, API latency) fiscal-worker and the bare
Celery baseline (bench/bare_app.py) run in the same Stack (bench/common.py: one private
Redis, one stand-in API), with the same pool, concurrency and Celery settings, 2 brands,
a rate budget far above need (the stand-in enforces none). Their runs alternate, fiscal-worker
run i then bare run i, so a load that comes and goes on the machine hits both. Timing:
  fiscal-worker  one worker process, started and idle (its consumer group made, nothing
                 scheduled) and warmed up by WARMUP results; the clock starts right before
                 the batch is XADDed to the ingest stream and stops at the last PATCH the
                 stand-in received: stream entry -> PATCH, ingest and dispatch included.
  bare Celery    the batch's tasks are enqueued while no bare worker runs; then one starts;
                 the clock runs from the first receipt GET to the last PATCH at the
                 stand-in (its start-up and the queueing are outside).
Results/s per run; per row the ratio fw median / bare median; the headline is the worst
row's ratio, target >= 0.8. A run's batch is MAX_RESULTS results unless the warm-up shows
fiscal-worker would need more than RUN_SECONDS for it; then fewer (never under
MIN_RESULTS); both sides of a row use the same size (details: results per row).

scale_out: fiscal-worker results/s with 1, 2 and 4 worker processes (prefork, concurrency
2 each, API at 0 ms) on one Stack; the fleet grows between the sizes, each size warmed up
first; SCALE_RESULTS results per run.

Every run is checked as it is measured: every receipt PATCHed exactly once, with its fiscal
id and lock (check_landed), and fiscal-worker left nothing scheduled or dead-lettered;
a run that lost or doubled anything raises Incorrect and no figure is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bare_app
from bench.common import (
    FAR_BUDGET,
    Incorrect,
    Key,
    Stack,
    check_landed,
    patch_counts,
    pyplot,
    save_plot,
    stored_receipts,
    summary,
)

NAME = "throughput_ratio"
SCALE_OUT_NAME = "scale_out"
TARGET = 0.8
MAX_RESULTS = 1500  # per run, both brands together
MIN_RESULTS = 200
RUN_SECONDS = 6.0  # a fiscal-worker run longer than this at the warm-up's pace gets fewer
WARMUP = 100  # results before the first measured run of a fleet (tokens, connections)
SCALE_RESULTS = 400
SCALE_PROCESSES = (1, 2, 4)
LAND_TIMEOUT = 180.0  # seconds a run may take before it counts as lost
AUTH_LIMIT = 100_000  # auth calls are not what this measures (bare re-auths per recycled child)


@dataclass(frozen=True)
class Row:
    pool: str
    concurrency: int
    latency: float  # seconds per API call

    @property
    def label(self) -> str:
        return f"{self.pool} x{self.concurrency}, {self.latency * 1000:.0f} ms"


ROWS = (
    Row("prefork", 2, 0.0),
    Row("threads", 16, 0.0),
    Row("prefork", 2, 0.020),
    Row("threads", 16, 0.020),
)


def _stack(latency: float) -> Stack:
    return Stack(latency=latency, rate_window=1, auth_limit=AUTH_LIMIT, settings=FAR_BUDGET)


def _batch(stack: Stack, size: int) -> dict[Key, str]:
    """`size` fresh results, split evenly between the brands."""
    return stack.batch(size // len(stack.brands))


def _checked(stack: Stack, expected: dict[Key, str]) -> dict[str, Any]:
    stats = stack.wait_landed(expected, LAND_TIMEOUT)
    check_landed(patch_counts(stats), expected, stored=stored_receipts(stats))
    return stats


def fw_run(stack: Stack, size: int) -> float:
    """One batch through the running fiscal-worker fleet: results/s, stream entry -> PATCH."""
    stack.standin.reset()
    expected = _batch(stack, size)
    started = time.time()
    stack.submit(expected)
    stats = _checked(stack, expected)
    stack.check_finished()
    return len(expected) / (max(stats["patch_times"].values()) - started)


def bare_run(stack: Stack, size: int, row: Row, index: int) -> float:
    """One batch through a bare Celery worker started on a full queue: results/s, first
    receipt GET -> last PATCH."""
    stack.standin.reset()
    expected = _batch(stack, size)
    jobs = [(brand, rid, fiscal_id) for (brand, rid), fiscal_id in expected.items()]
    bare_app.enqueue(stack.redis_server.url, jobs)
    stack.start_bare(f"bare{index}", row.concurrency, row.pool)
    try:
        stats = _checked(stack, expected)
    finally:
        stack.stop_workers(bare_only=True)
    first = min(t for t, method, *_ in stats["request_log"] if method == "GET")
    return len(expected) / (max(stats["patch_times"].values()) - first)


def warm_up(stack: Stack, results: int = WARMUP) -> float:
    """Run `results` through the fleet unmeasured (tokens, connections, first imports);
    their pace, results/s, sizes the measured runs."""
    return fw_run(stack, results)


def run_row(row: Row, runs: int, max_results: int) -> dict[str, Any]:
    with _stack(row.latency) as stack:
        stack.start_worker("fw", row.concurrency, row.pool)
        stack.wait_idle()
        pace = warm_up(stack)
        size = int(min(max_results, max(MIN_RESULTS, pace * RUN_SECONDS)))
        size -= size % len(stack.brands)
        fw, bare = [], []
        for index in range(runs):
            fw.append(fw_run(stack, size))
            bare.append(bare_run(stack, size, row, index))
    fw_summary, bare_summary = summary(fw), summary(bare)
    return {
        "row": row.label,
        "pool": row.pool,
        "concurrency": row.concurrency,
        "api_latency_ms": row.latency * 1000,
        "results": size,
        "warmup_results_per_s": round(pace, 1),
        "fiscal_worker": fw_summary,
        "bare_celery": bare_summary,
        "ratio": fw_summary["median"] / bare_summary["median"],
        "pair_ratios": [f / b for f, b in zip(fw, bare, strict=True)],
    }


def ratio_spread(top: dict[str, Any], bottom: dict[str, Any], pairs: list[float]) -> dict[str, Any]:
    """The figure-level median/min/max of a ratio of two summaries: median over median, and
    the extremes (top's min over bottom's max, top's max over bottom's min); runs = `pairs`."""
    return {
        "median": top["median"] / bottom["median"],
        "min": top["min"] / bottom["max"],
        "max": top["max"] / bottom["min"],
        "runs": pairs,
    }


def _check_mirrored_settings() -> None:
    """Refuse to compare against a baseline whose Celery settings drifted from the worker's."""
    try:
        from worker.app import app as worker_app
    except SystemExit as exc:  # worker.app exits on a bad FISCAL_* setting of this shell
        raise RuntimeError("worker.app did not load: check the FISCAL_* environment") from exc

    drift = bare_app.drift(worker_app.conf)
    if drift:
        raise Incorrect(f"bench/bare_app.py no longer mirrors worker/app.py: {drift}")


def measure(runs: int = 3, quick: bool = False) -> dict[str, Any]:
    _check_mirrored_settings()
    max_results = MIN_RESULTS if quick else MAX_RESULTS
    rows = [run_row(row, runs, max_results) for row in ROWS]
    worst = min(rows, key=lambda r: r["ratio"])
    fw, bare = worst["fiscal_worker"], worst["bare_celery"]
    return {
        "figure": NAME,
        "target": f">= {TARGET} (worst row)",
        "value": worst["ratio"],
        "unit": "x bare Celery (fiscal-worker median / bare median)",
        "met": worst["ratio"] >= TARGET,
        **ratio_spread(fw, bare, worst["pair_ratios"]),
        "details": {
            "worst_row": worst["row"],
            "rows": rows,
            "median_min_max": (
                "of the worst row: median = fw median / bare median, min = fw min / bare "
                "max, max = fw max / bare min; runs = fw run i / bare run i"
            ),
            "setup": (
                "2 brands, rate budget far above need (FISCAL_RATE_LIMIT_REQUESTS 1000000 "
                "per 1 s, stand-in enforcing none), Celery settings of worker/app.py on both"
            ),
            "timing": {
                "fiscal_worker": (
                    "one worker process, ready, idle and warmed up; from right before the "
                    "batch is XADDed to the ingest stream to the last PATCH at the stand-in"
                ),
                "bare_celery": (
                    "tasks enqueued with no worker running, then one worker started; from "
                    "the first receipt GET to the last PATCH at the stand-in"
                ),
            },
            "sizes": (
                f"{MAX_RESULTS} results per run unless the warm-up pace says fiscal-worker "
                f"would take over {RUN_SECONDS:.0f} s; then fewer, at least {MIN_RESULTS}"
            ),
        },
    }


def measure_scale_out(runs: int = 3, quick: bool = False) -> dict[str, Any]:
    size = MIN_RESULTS if quick else SCALE_RESULTS
    runs_of: list[list[float]] = []
    with _stack(0.0) as stack:
        for processes in SCALE_PROCESSES:
            while len(stack.workers) < processes:
                stack.start_worker(f"fw{len(stack.workers)}", 2, "prefork")
            stack.wait_idle()
            warm_up(stack)
            runs_of.append([fw_run(stack, size) for _ in range(runs)])
    points = [summary(values) for values in runs_of]
    first, last = runs_of[0], runs_of[-1]
    medians = [p["median"] for p in points]
    speedup = medians[-1] / medians[0]
    return {
        "figure": SCALE_OUT_NAME,
        "target": "information",
        "value": speedup,
        "unit": f"x the results/s of 1 process, with {SCALE_PROCESSES[-1]}",
        "met": None,
        **ratio_spread(points[-1], points[0], [a / b for a, b in zip(last, first, strict=True)]),
        "details": {
            "median_min_max": (
                f"median = median with {SCALE_PROCESSES[-1]} / median with 1, min = min / max, "
                "max = max / min; runs = run i with 4 / run i with 1"
            ),
            "setup": (
                f"prefork, concurrency 2 per process, API at 0 ms, 2 brands, {size} results "
                "per run, budget far above need; the fleet grows between sizes, each size "
                "warmed up first"
            ),
            "points": [
                {"processes": n, "results_per_s": p}
                for n, p in zip(SCALE_PROCESSES, points, strict=True)
            ],
        },
        "series": {
            "processes": list(SCALE_PROCESSES),
            "median": medians,
            "min": [p["min"] for p in points],
            "max": [p["max"] for p in points],
        },
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Results/s of fiscal-worker and bare Celery per row (median, min-max whiskers)."""
    plt = pyplot()
    rows = result["details"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.38
    for offset, side, label in (
        (-1, "fiscal_worker", "fiscal-worker"),
        (1, "bare_celery", "bare Celery"),
    ):
        xs = [i + offset * width / 2 for i in range(len(rows))]
        medians = [r[side]["median"] for r in rows]
        errors = [
            [r[side]["median"] - r[side]["min"] for r in rows],
            [r[side]["max"] - r[side]["median"] for r in rows],
        ]
        ax.bar(xs, medians, width, yerr=errors, capsize=3, label=label)
    for i, row in enumerate(rows):
        top = max(row["fiscal_worker"]["max"], row["bare_celery"]["max"])
        ax.annotate(f"{row['ratio']:.2f}", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["row"] for r in rows], fontsize=8)
    ax.set_ylabel("results / s")
    ax.set_title(f"Throughput against bare Celery (ratio above each pair; target {TARGET})")
    ax.legend(loc="upper right", fontsize=8)
    return save_plot(fig, path)


def plot_scale_out(result: dict[str, Any], path: Path) -> Path:
    """fiscal-worker results/s against worker processes (median, min-max band)."""
    plt = pyplot()
    series = result["series"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(series["processes"], series["median"], marker="o", label="median of the runs")
    ax.fill_between(series["processes"], series["min"], series["max"], alpha=0.2, label="min - max")
    ax.set_xticks(series["processes"])
    ax.set_xlabel("worker processes (prefork, concurrency 2 each)")
    ax.set_ylabel("results / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Scale-out on {os.cpu_count()} cores, API at 0 ms")
    ax.legend(loc="lower right", fontsize=8)
    return save_plot(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--figure", choices=("throughput", "scale_out"), default="throughput")
    parser.add_argument("--quick", action="store_true", help="smallest batches")
    args = parser.parse_args()
    figure = measure if args.figure == "throughput" else measure_scale_out
    result = figure(args.runs, quick=args.quick)
    print(json.dumps(result, indent=2))
    if args.figure == "throughput":
        for row in result["details"]["rows"]:
            fw, bare = row["fiscal_worker"]["median"], row["bare_celery"]["median"]
            print(f"{row['row']:<22} fw {fw:7.1f}/s  bare {bare:7.1f}/s  ratio {row['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
