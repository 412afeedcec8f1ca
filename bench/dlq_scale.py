"""Figure 7: the operator's reads at scale: the dead-letter store and a metrics scrape.

    .venv/bin/python bench/dlq_scale.py [--runs 3] [--entries 100000] [--keys 1000000]

One private redis-server (no persistence) is filled like a deployment that ran for months:
ENTRIES dead-letter entries (4 reasons, 20 brands, each with its stream entry id, payload
and parsed result: what `DeadLetterStore.add` writes) and KEYS audit records plus KEYS
fiscalised markers with the brands' rate and breaker state (bench/scrape.py's `fill`). The
dead-letter entries are written by the store's own `dlq_add` script, pipelined: the first
entry goes through `DeadLetterStore.add` itself and the others are built with the same
helpers (the entry JSON, index keys and counters of worker/dlq.py), their ids allocated in
one INCRBY instead of one INCR each. Then, `runs` times each:

    dlq list   `fiscal-worker dlq list --limit 50 --json`        target <= 50 ms
    dlq stats  `fiscal-worker dlq stats --json`                  target <= 500 ms
    scrape     one Prometheus collection + text rendering        target <= 100 ms
    web page   the console's first dead-letter page (GET /dead-letters, 50 rows, rendered)
                                                                 target <= 100 ms
    web filtered  the same, filtered by reason and brand (two indexes intersected): information

The CLI commands run in this process through click's CliRunner on the real command group
(settings read and Redis connected afresh each time, as a new process would; interpreter
start-up and imports excluded); the same commands as subprocesses are timed for information
(`subprocess_seconds`, start-up included). The scrape runs after one untimed scrape (the
exporter is a long-lived process). Correctness: `list` must return the 50 newest entries,
newest first, and `stats` must count every entry; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/dlq_scale.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from bench.common import Incorrect, summary
from bench.scrape import BRANDS, time_scrapes
from bench.scrape import fill as fill_audit
from worker import dlq, keys
from worker.cli import cli
from worker.ingest_format import to_rfc3339
from worker.metrics import RedisStateCollector
from worker.settings import Settings, get_settings
from worker.testing import RedisServer, clean_env

NAME = "dlq_scale"
ENTRIES = 100_000
AUDIT_KEYS = 1_000_000
LIST_LIMIT = 50
TARGETS = {"dlq_list": 0.050, "dlq_stats": 0.500, "scrape": 0.100, "web_page": 0.100}  # s
FILL_BATCH = 5_000  # dead-letter adds per pipeline
REASONS_FILLED = ("retries_exhausted", "receipt_not_found", "receipt_not_closed", "auth_failed")
ERRORS = {
    "retries_exhausted": "503 service_unavailable: Service unavailable (after 41 attempts)",
    "receipt_not_found": "404 not_found: Receipt not found (not-ready window ended)",
    "receipt_not_closed": "receipt still open at the end of the not-ready window",
    "auth_failed": "401 authentication_failed: Invalid credentials (5 tries)",
}


def entry_fields(n: int) -> dict[str, Any]:
    """The add() arguments of the n-th dead letter: a mix of reasons and brands."""
    brand = BRANDS[n % len(BRANDS)]
    reason = REASONS_FILLED[n % len(REASONS_FILLED)]
    result = {
        "receipt_id": 100_000 + n,
        "brand": brand,
        "fiscal_id": f"FISC{n:012d}",
        "device_id": f"printer-{n % 7}",
        "venue_id": None,
        "printed_at": None,
        "result_id": None,
    }
    return {
        "reason": reason,
        "payload": json.dumps({k: v for k, v in result.items() if v is not None}),
        "error": ERRORS[reason],
        "attempts": 1 + n % 40,
        "http_status": {"retries_exhausted": 503, "receipt_not_found": 404}.get(reason),
        "result": result,
        "rid": f"{1_700_000_000_000 + n}-0",
    }


def fill_dlq(r: redis.Redis, entries: int) -> None:
    """`entries` dead letters through the store's dlq_add script (see the module docstring)."""
    store = dlq.DeadLetterStore(r)
    store.add(**entry_fields(1))  # the reference entry, by the store's own add()
    first = int(r.incrby(keys.DLQ_SEQ, entries - 1)) - (entries - 2)
    now = to_rfc3339()
    for start in range(first, first + entries - 1, FILL_BATCH):
        with r.pipeline(transaction=False) as pipe:
            for seq in range(start, min(start + FILL_BATCH, first + entries - 1)):
                fields = entry_fields(seq)
                entry_id = f"dl-{seq}"
                entry = {
                    "id": entry_id,
                    "reason": fields["reason"],
                    "receipt_id": fields["result"]["receipt_id"],
                    "brand": fields["result"]["brand"],
                    "fiscal_id": fields["result"]["fiscal_id"],
                    "attempts": fields["attempts"],
                    "first_seen": now,
                    "last_seen": now,
                    "error": fields["error"],
                    "http_status": fields["http_status"],
                    **dlq._payload_fields(fields["payload"]),
                    "result": fields["result"],
                    "result_id": fields["rid"],
                }
                script_keys, args = dlq._addition(entry_id, entry, seq, dlq._dumps(entry))
                store._add_script(keys=script_keys, args=args, client=pipe)
            pipe.execute()
    reference, copy = store.get("dl-1"), store.get(f"dl-{first}")
    if reference is None or copy is None or set(reference) != set(copy):
        raise Incorrect("the pipelined dead-letter entries differ in shape from add()'s")


def run_cli(runner: CliRunner, url: str, args: list[str]) -> tuple[float, Any]:
    """One in-process CLI call: (seconds, its parsed JSON output)."""
    get_settings.cache_clear()  # settings read afresh, as by a new process
    started = time.perf_counter()
    outcome = runner.invoke(cli, args, env={"FISCAL_REDIS_URL": url}, catch_exceptions=False)
    took = time.perf_counter() - started
    if outcome.exit_code != 0:
        raise Incorrect(f"fiscal-worker {' '.join(args)} exited {outcome.exit_code}")
    return took, json.loads(outcome.stdout)


def run_subprocess(url: str, args: list[str]) -> float:
    env = {**clean_env(), "FISCAL_REDIS_URL": url}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def time_console(
    r: redis.Redis, url: str, entries: int, runs: int
) -> tuple[list[float], list[float]]:
    """The console's first dead-letter page, unfiltered and filtered by reason and brand, in
    this process (Starlette's TestClient: the app's routing, Redis reads and rendering; no
    socket). Its session is --no-auth's, so no password hash is timed."""
    from starlette.testclient import TestClient

    from worker.web.app import create_app

    app = create_app(Settings(redis_url=url), r, None)
    plain, filtered = [], []
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.get("/dead-letters")  # untimed: the session, the templates compiled
        query = f"/dead-letters?reason={REASONS_FILLED[1]}&brand={BRANDS[1]}"
        for _ in range(runs):
            started = time.perf_counter()
            page = client.get("/dead-letters")
            plain.append(time.perf_counter() - started)
            rows = re.findall(r'<tr data-id="(dl-[0-9]+)"', page.text)
            if page.status_code != 200 or rows != [
                f"dl-{n}" for n in range(entries, entries - LIST_LIMIT, -1)
            ]:
                raise Incorrect("the console's first page is not the 50 newest entries")
            started = time.perf_counter()
            page = client.get(query)
            filtered.append(time.perf_counter() - started)
            if page.status_code != 200 or len(re.findall(r"<tr data-id=", page.text)) != 50:
                raise Incorrect("the console's filtered page does not have 50 entries")
    return plain, filtered


def check_list(page: list[dict[str, Any]], entries: int) -> None:
    expected = [f"dl-{n}" for n in range(entries, entries - LIST_LIMIT, -1)]
    if [entry.get("id") for entry in page] != expected:
        raise Incorrect(f"dlq list did not return the {LIST_LIMIT} newest entries")


def check_stats(stats: dict[str, Any], entries: int) -> None:
    if stats["total"] != entries or sum(stats["by_reason"].values()) != entries:
        raise Incorrect(f"dlq stats counts {stats['total']} entries, not {entries}")


def figure(name: str, took: list[float], subprocess_took: list[float] | None) -> dict[str, Any]:
    stats = summary(took)
    figures = {
        "target": f"<= {TARGETS[name] * 1e3:.0f} ms",
        "unit": "s",
        **stats,
        "met": stats["median"] <= TARGETS[name],
    }
    if subprocess_took is not None:
        figures["subprocess_seconds"] = summary(subprocess_took)
    return figures


def measure(
    runs: int = 3, entries: int = ENTRIES, audit_keys: int = AUDIT_KEYS, quick: bool = False
) -> dict[str, Any]:
    """`quick`: 10,000 dead letters and 100,000 audit records, to try the harness."""
    started = time.perf_counter()
    if quick:
        entries, audit_keys = min(entries, 10_000), min(audit_keys, 100_000)
    with tempfile.TemporaryDirectory(prefix="fw-dlq-scale-") as folder:
        server = RedisServer(Path(folder), persistent=False, detached=True)
        server.start()
        try:
            r = server.client()
            fill_dlq(r, entries)
            fill_audit(r, audit_keys)
            filled = {"keys": r.dbsize(), "seconds": round(time.perf_counter() - started, 1)}
            runner = CliRunner()
            list_args = ["dlq", "list", "--limit", str(LIST_LIMIT), "--json"]
            stats_args = ["dlq", "stats", "--json"]
            list_took, stats_took = [], []
            for _ in range(runs):
                took, page = run_cli(runner, server.url, list_args)
                check_list(page, entries)
                list_took.append(took)
                took, counts = run_cli(runner, server.url, stats_args)
                check_stats(counts, entries)
                stats_took.append(took)
            list_sub = [run_subprocess(server.url, list_args) for _ in range(runs)]
            stats_sub = [run_subprocess(server.url, stats_args) for _ in range(runs)]
            registry = CollectorRegistry()
            registry.register(RedisStateCollector(r, Settings(redis_url=server.url)))
            time_scrapes(registry, 1)  # untimed: the exporter's first scrape loads scripts
            scrape_took = time_scrapes(registry, runs)
            web_took, filtered_took = time_console(r, server.url, entries, runs)
        finally:
            server.stop()
    details = {
        "dlq_list": figure("dlq_list", list_took, list_sub),
        "dlq_stats": figure("dlq_stats", stats_took, stats_sub),
        "scrape": figure("scrape", scrape_took, None),
        "web_page": figure("web_page", web_took, None),
        "web_filtered": {"unit": "s", **summary(filtered_took)},
        "filled": {"dlq_entries": entries, "audit_records": audit_keys, **filled},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    headline = details["dlq_list"]
    return {
        "figure": NAME,
        "target": "dlq list <= 50 ms, dlq stats <= 500 ms, scrape (1M keys) <= 100 ms, "
        "console's first dead-letter page <= 100 ms",
        "value": headline["median"],
        "unit": "s (dlq list, median)",
        "met": all(details[name]["met"] for name in TARGETS),
        "median": headline["median"],
        "min": headline["min"],
        "max": headline["max"],
        "runs": headline["runs"],
        "details": details,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--entries", type=int, default=ENTRIES)
    parser.add_argument("--keys", type=int, default=AUDIT_KEYS, help="audit records to fill")
    args = parser.parse_args()
    result = measure(args.runs, args.entries, args.keys)
    print(json.dumps(result, indent=2))
    for name in TARGETS:
        fig = result["details"][name]
        print(
            f"{name:10s} median {fig['median'] * 1e3:7.1f} ms (min {fig['min'] * 1e3:.1f}, "
            f"max {fig['max'] * 1e3:.1f}); target {fig['target']}: "
            f"{'met' if fig['met'] else 'NOT met'}"
        )
    print(f"filled {result['details']['filled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
