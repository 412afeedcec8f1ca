"""The benchmark suite in one command (`make bench`): every figure, one JSON document, a table.

    .venv/bin/python -m bench.run [--runs 3] [--only throughput,scale_out,...] [--quick]

Runs each figure module's `measure(runs)` in the order of FIGURES, then
  - prints a short table (figure, value, target, met) and the JSON document;
  - saves the document as bench/results/latest.json (machine: core count, versions of
    Python, Celery, redis-py and redis-server; the commit; the date). With --only, the
    figures not run are carried over from the previous latest.json, each keeping its own
    commit and date; a --quick run (smaller batches, for trying the harness) is saved as
    bench/results/quick.json instead and touches neither the plots nor the docs;
  - draws the plots under docs/performance/ (matplotlib, Agg: the `bench` extra) with each
    module's plotting function;
  - regenerates the figures table of docs/performance.md (bench/report.py).
A figure whose module is missing or raises is reported with its error, never dropped; one
that raised Incorrect (a run lost or doubled a result) as "refused: <why>". The exit status
is 1 if any figure was refused, failed or missing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench import report
from bench.common import ROOT, Incorrect

RESULTS_DIR = ROOT / "bench" / "results"
LATEST = RESULTS_DIR / "latest.json"
QUICK = RESULTS_DIR / "quick.json"
PLOTS_DIR = ROOT / "docs" / "performance"


@dataclass(frozen=True)
class Figure:
    key: str  # --only name, JSON key, plot file name
    module: str
    measure: str = "measure"
    plot: str | None = None  # the module's plot(result, path), if it draws one


FIGURES = (
    Figure("throughput", "bench.throughput", plot="plot"),
    Figure("budget_efficiency", "bench.budget_efficiency"),
    Figure("fairness", "bench.fairness", plot="plot"),
    Figure("latency", "bench.latency"),
    Figure("cold_start", "bench.cold_start"),
    Figure("memory", "bench.backlog_memory"),
    Figure("dlq_scale", "bench.dlq_scale"),
    Figure("scale_out", "bench.throughput", "measure_scale_out", plot="plot_scale_out"),
    Figure("redis_cost", "bench.redis_cost"),
    Figure("footprint", "bench.footprint"),
)


def run_figure(figure: Figure, runs: int, quick: bool) -> dict[str, Any]:
    """The figure's result with "status" ok / refused / failed / missing and its seconds."""
    started = time.monotonic()
    try:
        module = importlib.import_module(figure.module)
        measure = getattr(module, figure.measure)
    except (ImportError, AttributeError) as exc:
        absent = isinstance(exc, ModuleNotFoundError) and exc.name == figure.module
        status = "missing" if absent or isinstance(exc, AttributeError) else "failed"
        result = {"status": status, "error": f"{exc.__class__.__name__}: {exc}"}
    else:
        kwargs = (
            {"quick": True} if quick and "quick" in inspect.signature(measure).parameters else {}
        )
        try:
            result = {**measure(runs, **kwargs), "status": "ok"}
        except Incorrect as exc:
            result = {"status": "refused", "error": str(exc)}
        except Exception as exc:
            result = {
                "status": "failed",
                "error": f"{exc.__class__.__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8),
            }
    result.setdefault("figure", figure.key)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _output(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def environment() -> dict[str, Any]:
    import celery
    import redis

    commit = _output("git", "rev-parse", "HEAD")
    dirty = _output("git", "status", "--porcelain", "--untracked-files=no") not in ("", "unknown")
    server = _output("redis-server", "--version").split()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "redis_py": redis.__version__,
        "redis_server": next((w[2:] for w in server if w.startswith("v=")), "unknown"),
    }


def draw(figures: dict[str, dict[str, Any]], ran: list[Figure]) -> dict[str, str]:
    """Each plot of a figure that ran and succeeded; {key: path or error}."""
    drawn = {}
    for figure in ran:
        result = figures[figure.key]
        if figure.plot is None or result.get("status") != "ok":
            continue
        path = PLOTS_DIR / f"{figure.key}.png"
        try:
            getattr(importlib.import_module(figure.module), figure.plot)(result, path)
            drawn[figure.key] = str(path.relative_to(ROOT))
        except Exception as exc:  # a plot never hides the figures
            drawn[figure.key] = f"not drawn: {exc.__class__.__name__}: {exc}"
    return drawn


def table(figures: dict[str, dict[str, Any]]) -> str:
    rows = [("figure", "value", "target", "met")]
    for key, result in figures.items():
        rows.append((key, *report.cells(result)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _value(result: dict[str, Any] | None) -> float | None:
    """A figure's headline value; None if it was refused, failed or not run."""
    if not result or result.get("status") != "ok":
        return None
    return result.get("value")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (>= 3 to publish)")
    parser.add_argument("--only", default="", help="comma-separated figure keys")
    parser.add_argument("--quick", action="store_true", help="smaller batches, quick.json")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - {f.key for f in FIGURES}
    if unknown:
        parser.error(f"unknown figures {sorted(unknown)}; known: {[f.key for f in FIGURES]}")
    ran = [f for f in FIGURES if not wanted or f.key in wanted]
    target = QUICK if args.quick else LATEST

    started = time.monotonic()
    env = environment()
    figures: dict[str, dict[str, Any]] = {}
    for figure in ran:
        print(f"-- {figure.key} ...", file=sys.stderr, flush=True)
        result = figures[figure.key] = {
            **run_figure(figure, args.runs, args.quick),
            "measured": env,
        }
        print(f"-- {figure.key}: {result['status']} in {result['seconds']} s", file=sys.stderr)
    if wanted and not args.quick and LATEST.exists():
        previous = json.loads(LATEST.read_text(encoding="utf-8")).get("figures", {})
        figures = {f.key: figures.get(f.key) or previous.get(f.key) for f in FIGURES}
        figures = {k: v for k, v in figures.items() if v is not None}
    document = {
        **env,
        # the two headline figures, also inside "figures"
        "throughput_ratio": _value(figures.get("throughput")),
        "budget_efficiency": _value(figures.get("budget_efficiency")),
        "runs": args.runs,
        "quick": args.quick,
        "ran": [f.key for f in ran],
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "figures": figures,
    }
    if not args.quick:
        document["plots"] = draw(figures, ran)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if not args.quick:
        report.write(document)

    print(json.dumps(document, indent=2))
    print()
    print(table(figures))
    print(f"\nsaved {target.relative_to(ROOT)} in {document['elapsed_seconds']} s")
    bad = [k for k in document["ran"] if figures[k]["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
