"""Figure 10: what a finished result leaves in Redis, in keys and bytes, at default settings.

    .venv/bin/python bench/footprint.py [--runs 3] [--results 1000]

One Stack (bench/common.py), one fiscal-worker process (prefork x2), the stand-in API at
0 ms, a budget far above need, the worker's default retention (audit trail, fiscalised
marker, dead-letter store). After a warm-up, each run sends RESULTS results, waits until
every one is finished, and compares Redis before and after:

  fiscalised     RESULTS receipts of the stand-in's brands, each PATCHed once
  dead-lettered  RESULTS results of a brand without credentials (`unknown_brand`): each
                 becomes a dead-letter entry (its payload is the ~70-byte stream entry)

Per result, for each kind:
  keys          the keys Redis holds after the run minus before (DBSIZE), per result
  bytes         `MEMORY USAGE key SAMPLES 0` summed over every key the run added or grew,
                per result, by kind of key (its name with brand, receipt and ids replaced
                by placeholders): what the retention of each kind of key costs
  used_memory   `INFO memory` used_memory after minus before, per result: what the
                allocator holds (key names, dict slots, fragmentation included)
  redis CPU     `INFO cpu` (user + system) after minus before, per result, while the
                results went through (the snapshot's own commands left out; the idle
                worker's polling during the run included)

The stream entries are deleted once acknowledged and the schedule and locks leave with
the result, so what remains is what the retention settings keep. Every run is checked:
each fiscalised receipt PATCHed once, each dead-lettered result in the store once, nothing
left scheduled; else Incorrect.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/footprint.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import (
    FAR_BUDGET,
    STREAM,
    Incorrect,
    Stack,
    check_landed,
    patch_counts,
    stored_receipts,
    summary,
)
from worker import keys
from worker.testing import wait_for

NAME = "footprint"
RESULTS = 1000
WARMUP = 100
LAND_TIMEOUT = 180.0
UNKNOWN_BRAND = "bench-unknown"  # no credentials: every result of it is dead-lettered
TARGET_KEYS = 1.0  # per fiscalised receipt (issue: at most 1 key and 400 bytes)
TARGET_BYTES = 400.0

_PLACEHOLDERS = (
    (re.compile(r"\{b:[^}]*\}"), "{b:<brand>}"),
    (re.compile(r"dl-\d+"), "dl-<n>"),
    (re.compile(r"\d+-\d+"), "<stream id>"),
    (re.compile(r"(?<=:)\d+(?=:|$)"), "<n>"),
)


def kind(key: str) -> str:
    """A key's name with its brand, receipt and ids replaced: fw:{b:<brand>}:audit:<n>."""
    for pattern, placeholder in _PLACEHOLDERS:
        key = pattern.sub(placeholder, key)
    return key


def snapshot(client: redis.Redis) -> dict[str, int]:
    """{key: MEMORY USAGE} of every key (SCAN), and the two totals under '' keys."""
    sizes: dict[str, int] = {}
    pipe_keys: list[str] = []
    for key in client.scan_iter(count=1000):
        pipe_keys.append(key.decode() if isinstance(key, bytes) else key)
    for start in range(0, len(pipe_keys), 1000):
        chunk = pipe_keys[start : start + 1000]
        with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.memory_usage(key, samples=0)
            for key, size in zip(chunk, pipe.execute(), strict=True):
                if size is not None:  # gone meanwhile
                    sizes[key] = int(size)
    return sizes


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def cpu_seconds(client: redis.Redis) -> float:
    """redis-server's CPU time so far (user + system, its main thread's included)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def grown(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    """Bytes by kind of key: keys added, and the growth of keys that were there."""
    out: Counter[str] = Counter()
    for key, size in after.items():
        delta = size - before.get(key, 0)
        if delta > 0:
            out[kind(key)] += delta
    return out


def added_keys(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    return Counter(kind(key) for key in after.keys() - before.keys())


def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """`wait_for`, with a run that does not get there refused (Incorrect), not a failed test."""
    try:
        wait_for(condition, timeout=timeout, what=what)
    except AssertionError as exc:
        raise Incorrect(str(exc)) from None


def finished(stack: Stack) -> bool:
    """Nothing scheduled, queued, pending on the stream or left in it."""
    pending = stack.redis.xpending(STREAM, keys.INGEST_GROUP)["pending"]
    busy = stack.redis.zcard(keys.SCHEDULE) or stack.redis.llen(keys.CELERY_QUEUE)
    return not busy and not pending and not stack.redis.xlen(STREAM)


def measure_kind(stack: Stack, what: str, results: int) -> dict[str, Any]:
    """One run of one kind: keys, bytes by kind of key and used_memory, per result."""
    stack.standin.reset()
    until(lambda: finished(stack), 30, "the stack idle")
    before, memory_before = snapshot(stack.redis), used_memory(stack.redis)
    cpu_before = cpu_seconds(stack.redis)
    dead_before = stack.redis.zcard(keys.DLQ_INDEX)
    if what == "fiscalised":
        expected = stack.batch(results // len(stack.brands))
        stack.submit(expected)
        stats = stack.wait_landed(expected, LAND_TIMEOUT)
        check_landed(patch_counts(stats), expected, stored=stored_receipts(stats))
        until(lambda: finished(stack), 30, "every result finished")
        n = len(expected)
    else:
        stack.submit(stack.batch(results, brands=(UNKNOWN_BRAND,)))
        until(
            lambda: stack.redis.zcard(keys.DLQ_INDEX) - dead_before >= results,
            LAND_TIMEOUT,
            "every dead letter",
        )
        until(lambda: finished(stack), 30, "every result finished")
        if stack.redis.zcard(keys.DLQ_INDEX) - dead_before != results:
            raise Incorrect("a result was dead-lettered twice")
        n = results
    cpu = cpu_seconds(stack.redis) - cpu_before  # before the snapshot's own commands
    after, memory_after = snapshot(stack.redis), used_memory(stack.redis)
    by_kind = grown(before, after)
    return {
        "keys": (len(after) - len(before)) / n,
        "bytes": sum(by_kind.values()) / n,
        "used_memory": (memory_after - memory_before) / n,
        "redis_cpu_ms": cpu * 1000 / n,
        "bytes_by_kind": {k: round(v / n, 1) for k, v in by_kind.most_common() if v / n >= 0.5},
        "keys_by_kind": {k: round(c / n, 3) for k, c in added_keys(before, after).most_common()},
    }


def measure(runs: int = 3, results: int = RESULTS, quick: bool = False) -> dict[str, Any]:
    results = min(results, 200) if quick else results
    measured: dict[str, list[dict[str, Any]]] = {"fiscalised": [], "dead_lettered": []}
    with Stack(rate_window=1, settings=FAR_BUDGET) as stack:
        stack.start_worker("fw", 2, "prefork")
        stack.wait_idle()
        warm = stack.batch(WARMUP // len(stack.brands))
        stack.submit(warm)
        stack.wait_landed(warm, LAND_TIMEOUT)
        stack.check_finished()
        for _ in range(runs):
            for what, out in measured.items():
                out.append(measure_kind(stack, what, results))
    fiscalised = measured["fiscalised"]
    middle = sorted(fiscalised, key=lambda r: r["bytes"])[runs // 2]
    dead_middle = sorted(measured["dead_lettered"], key=lambda r: r["bytes"])[runs // 2]
    keys_per = summary(r["keys"] for r in fiscalised)
    bytes_per = summary(r["bytes"] for r in fiscalised)
    return {
        "figure": NAME,
        "target": f"<= {TARGET_KEYS:.0f} key and <= {TARGET_BYTES:.0f} B per fiscalised receipt",
        "value": bytes_per["median"],
        "unit": "bytes retained per fiscalised receipt (MEMORY USAGE)",
        # keys per result to 2 decimals: a brand's own keys created during a run (its
        # rate window, one per brand) add a few thousandths, not a key per result
        "met": round(keys_per["max"], 2) <= TARGET_KEYS and bytes_per["max"] <= TARGET_BYTES,
        **bytes_per,
        "details": {
            "setup": (
                f"1 fiscal-worker process, prefork x2, API at 0 ms, default retention; "
                f"{results} results per run and kind after {WARMUP} warm-up"
            ),
            "fiscalised": {
                "keys_per_result": keys_per,
                "bytes_per_result": bytes_per,
                "used_memory_per_result": summary(r["used_memory"] for r in fiscalised),
                "redis_cpu_ms_per_result": summary(r["redis_cpu_ms"] for r in fiscalised),
                "median_run": {
                    "bytes_by_kind": middle["bytes_by_kind"],
                    "keys_by_kind": middle["keys_by_kind"],
                },
            },
            "dead_lettered": {
                "keys_per_result": summary(r["keys"] for r in measured["dead_lettered"]),
                "bytes_per_result": summary(r["bytes"] for r in measured["dead_lettered"]),
                "used_memory_per_result": summary(
                    r["used_memory"] for r in measured["dead_lettered"]
                ),
                "median_run": {
                    "bytes_by_kind": dead_middle["bytes_by_kind"],
                    "keys_by_kind": dead_middle["keys_by_kind"],
                },
            },
            "method": (
                "DBSIZE-like key counts and MEMORY USAGE (SAMPLES 0) of every key before and "
                "after a run, by kind of key; INFO memory used_memory before and after"
            ),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=int, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.runs, args.results)
    print(json.dumps(result, indent=2))
    for what in ("fiscalised", "dead_lettered"):
        details = result["details"][what]
        print(
            f"{what:<14} keys {details['keys_per_result']['median']:5.2f}  "
            f"bytes {details['bytes_per_result']['median']:7.0f}  "
            f"used_memory {details['used_memory_per_result']['median']:7.0f}  per result"
        )
    cpu = result["details"]["fiscalised"]["redis_cpu_ms_per_result"]["median"]
    print(f"redis-server CPU per fiscalised result: {cpu:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
