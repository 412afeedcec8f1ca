"""Figure 9: what one fiscalised result costs Redis, in round trips and in commands.

    .venv/bin/python bench/redis_cost.py [--runs 3] [--results 500]

One Stack (bench/common.py), one fiscal-worker process (prefork x2), the stand-in API at
0 ms, a budget far above need; after a warm-up, each run XADDs RESULTS results and waits
until every PATCH landed. Two independent counts, each with the idle rate of the same
fleet (measured for IDLE_SECONDS before the runs: the dispatcher's 0.2 s passes, the
ingest's blocking reads, the heartbeat) subtracted, per result:

  round trips  every worker connection (the worker's own clients and Celery's, kombu's)
               goes through `CountingProxy`, a TCP proxy that reads the RESP requests:
               a round trip is a burst of requests a client sends before the server
               answers (a pipeline or a MULTI..EXEC sent at once is one; a WATCH
               transaction is as many as it waits for answers). Each connection is
               fiscal-worker's if it ever touched one of its keys (fw:*, the ingest
               stream), Celery's if it used kombu's (BRPOP, PUBLISH, unacked*, _kombu.*),
               so ours and Celery's are told apart; the top-level commands it saw are
               counted the same way, by name.
  commands     `INFO commandstats` before and after a run: every command Redis executed,
               inside scripts and transactions too (an EVALSHA counts 1, and so does
               each redis.call it makes), by name; the harness's own XADDs (the adapter's
               part: 1 per result) and INFO are left out.

The proxy adds a hop, so a run is slower than without it; what is counted does not depend
on speed, except the dispatcher's passes, which run as often as results are due. Every run
is checked (each receipt PATCHed once with its fiscal id and lock, nothing left scheduled
or dead-lettered), else Incorrect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/redis_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import (
    FAR_BUDGET,
    STREAM,
    Stack,
    check_landed,
    patch_counts,
    stored_receipts,
    summary,
)

NAME = "redis_cost"
RESULTS = 300
WARMUP = 100
IDLE_SECONDS = 3.0
LAND_TIMEOUT = 120.0
KOMBU_COMMANDS = frozenset({"BRPOP", "BLPOP", "PUBLISH", "SUBSCRIBE", "PSUBSCRIBE"})
KOMBU_KEYS = ("unacked", "_kombu.")
OUR_KEYS = ("fw:", STREAM)
NO_KEYS = frozenset(
    {"MULTI", "EXEC", "DISCARD", "PING", "INFO", "AUTH", "HELLO", "SELECT", "CLIENT", "SCRIPT"}
)


# --- the counting proxy ----------------------------------------------------------------


def _parse(buffer: bytearray) -> tuple[list[list[bytes]], int]:
    """The complete RESP requests (arrays of bulk strings, as redis-py sends) at the start
    of `buffer`, and how many bytes they took."""
    commands, pos = [], 0
    while True:
        start = pos
        end = buffer.find(b"\r\n", pos)
        if end < 0 or buffer[pos : pos + 1] != b"*":
            return commands, start
        count, pos = int(buffer[pos + 1 : end]), end + 2
        parts = []
        for _ in range(count):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return commands, start
            length = int(buffer[pos + 1 : end])
            if len(buffer) < end + 2 + length + 2:
                return commands, start
            parts.append(bytes(buffer[end + 2 : end + 2 + length]))
            pos = end + 2 + length + 2
        commands.append(parts)


def command_keys(parts: list[bytes]) -> list[bytes]:
    """The keys a request names (enough to tell whose connection it is)."""
    name = parts[0].upper().decode()
    args = parts[1:]
    if name in NO_KEYS or not args:
        return []
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL"):
        return args[2 : 2 + int(args[1])]
    if name in ("XREAD", "XREADGROUP"):
        upper = [a.upper() for a in args]
        rest = args[upper.index(b"STREAMS") + 1 :] if b"STREAMS" in upper else []
        return rest[: len(rest) // 2]
    if name in ("BRPOP", "BLPOP"):
        return args[:-1]
    return args[:1]


@dataclass
class ConnectionCount:
    """What one client connection sent: round trips, and top-level commands by name."""

    round_trips: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    ours: bool = False
    kombu: bool = False
    awaiting: bool = False  # a request went up and no answer came back yet

    def note(self, parts: list[bytes]) -> None:
        name = parts[0].upper().decode()
        self.commands[name] += 1
        if name in KOMBU_COMMANDS:
            self.kombu = True
        for key in command_keys(parts):
            text = key.decode("utf-8", "replace")
            if text.startswith(OUR_KEYS):
                self.ours = True
            elif text.startswith(KOMBU_KEYS):
                self.kombu = True

    @property
    def owner(self) -> str:
        return "fiscal_worker" if self.ours else "celery" if self.kombu else "other"


class CountingProxy:
    """A TCP proxy in front of a Redis (its own event loop in a thread) that counts what
    every client connection sends; `snapshot()` sums them by owner."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[ConnectionCount] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)

    def start(self) -> int:
        """Start it; returns its port."""
        self.thread.start()
        self.ready.wait(10)
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.close()

    def stop(self) -> None:
        """Close every connection and the listener, and end the thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{owner: {"round_trips": n, "commands": {name: n}}}, over every connection so far
        (read from another thread: the counters only grow, a torn read is one request off)."""
        totals: dict[str, dict[str, Any]] = {}
        for conn in list(self.connections):
            entry = totals.setdefault(conn.owner, {"round_trips": 0, "commands": Counter()})
            entry["round_trips"] += conn.round_trips
            entry["commands"].update(conn.commands)
        return totals

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        conn = ConnectionCount()
        self.connections.append(conn)
        await asyncio.gather(
            self._requests(reader, up_writer, conn),
            self._answers(up_reader, writer, conn),
            return_exceptions=True,
        )
        for stream in (writer, up_writer):
            with contextlib.suppress(OSError):
                stream.close()

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, conn: ConnectionCount
    ) -> None:
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                if not conn.awaiting:
                    conn.round_trips += 1
                    conn.awaiting = True
                buffer += data
                commands, used = _parse(buffer)
                del buffer[:used]
                for parts in commands:
                    conn.note(parts)
                up.write(data)
                await up.drain()
        finally:
            with contextlib.suppress(OSError):
                up.close()

    async def _answers(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ConnectionCount
    ) -> None:
        try:
            while data := await up.read(65536):
                conn.awaiting = False
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.close()


# --- the measurement -------------------------------------------------------------------


def _commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for owner in after:
        old = before.get(owner, {"round_trips": 0, "commands": Counter()})
        out[owner] = {
            "round_trips": after[owner]["round_trips"] - old["round_trips"],
            "commands": after[owner]["commands"] - old["commands"],
        }
    return out


def _per_result(
    counts: dict[str, Any], idle: dict[str, Any], seconds: float, idle_seconds: float, n: int
) -> dict[str, Any]:
    """Per result, the idle rate over `seconds` subtracted (floored at 0)."""
    share = seconds / idle_seconds
    trips = max(0.0, counts["round_trips"] - idle.get("round_trips", 0) * share)
    commands = {
        name: max(0.0, count - idle.get("commands", {}).get(name, 0) * share) / n
        for name, count in counts["commands"].items()
    }
    return {
        "round_trips": trips / n,
        "commands": sum(commands.values()),
        "by_command": _rounded(commands),
    }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    ordered = sorted(values.items(), key=lambda kv: -kv[1])
    return {name: round(v, 3) for name, v in ordered if abs(v) >= 0.005}


def one_run(stack: Stack, proxy: CountingProxy, results: int) -> tuple[dict, Counter, float]:
    """One batch: (proxy counts, commandstats delta, seconds), checked."""
    stack.standin.reset()
    expected = stack.batch(results // len(stack.brands))
    proxy_before, stats_before = proxy.snapshot(), _commandstats(stack.redis)
    started = time.monotonic()
    stack.submit(expected)
    stats = stack.wait_landed(expected, LAND_TIMEOUT)
    seconds = time.monotonic() - started
    proxy_after, stats_after = proxy.snapshot(), _commandstats(stack.redis)
    check_landed(patch_counts(stats), expected, stored=stored_receipts(stats))
    stack.check_finished()
    executed = stats_after - stats_before
    executed["xadd"] -= len(expected)  # the adapter's, sent by the harness
    executed.pop("info", None)
    return _delta(proxy_after, proxy_before), executed, seconds


def measure(runs: int = 3, results: int = RESULTS, quick: bool = False) -> dict[str, Any]:
    results = min(results, 200) if quick else results
    with Stack(rate_window=1, settings=FAR_BUDGET) as stack:
        proxy = CountingProxy(stack.redis_server.port)
        port = proxy.start()
        try:
            via_proxy = stack.redis_server.url.replace(f":{stack.redis_server.port}/", f":{port}/")
            stack.start_worker("fw", 2, "prefork", FISCAL_REDIS_URL=via_proxy)
            stack.wait_idle()
            warm = stack.batch(WARMUP // len(stack.brands))
            stack.submit(warm)
            stack.wait_landed(warm, LAND_TIMEOUT)
            stack.check_finished()
            idle_proxy, idle_stats = proxy.snapshot(), _commandstats(stack.redis)
            time.sleep(IDLE_SECONDS)
            idle_proxy = _delta(proxy.snapshot(), idle_proxy)
            idle_stats = _commandstats(stack.redis) - idle_stats
            idle_stats.pop("info", None)
            measured = [one_run(stack, proxy, results) for _ in range(runs)]
        finally:
            stack.stop_workers()  # before the proxy their connections go through
            proxy.stop()
    per_run = []
    for counts, executed, seconds in measured:
        owners = {
            owner: _per_result(c, idle_proxy.get(owner, {}), seconds, IDLE_SECONDS, results)
            for owner, c in counts.items()
        }
        executed_all = _per_result(
            {"round_trips": 0, "commands": executed},
            {"commands": idle_stats},
            seconds,
            IDLE_SECONDS,
            results,
        )
        per_run.append({"owners": owners, "executed": executed_all, "seconds": seconds})
    trips = [sum(o["round_trips"] for o in r["owners"].values()) for r in per_run]
    middle = per_run[sorted(range(runs), key=lambda i: trips[i])[runs // 2]]
    return {
        "figure": NAME,
        "target": "information",
        "value": summary(trips)["median"],
        "unit": "Redis round trips per result (fiscal-worker's + Celery's)",
        "met": None,
        **summary(trips),
        "details": {
            "setup": (
                f"1 fiscal-worker process, prefork x2, API at 0 ms, 2 brands, {results} "
                f"results per run after {WARMUP} warm-up; the idle rate over {IDLE_SECONDS:.0f}"
                " s subtracted"
            ),
            "round_trips_per_result": {
                owner: summary(r["owners"].get(owner, {}).get("round_trips", 0.0) for r in per_run)
                for owner in ("fiscal_worker", "celery", "other")
            },
            "commands_executed_per_result": summary(r["executed"]["commands"] for r in per_run),
            "median_run": {
                "top_level_commands_per_result": {
                    owner: {"total": round(o["commands"], 2), "by_command": o["by_command"]}
                    for owner, o in middle["owners"].items()
                },
                "executed_by_command_per_result": middle["executed"]["by_command"],
                "seconds": round(middle["seconds"], 2),
            },
            "idle_per_second": {
                "round_trips": {
                    owner: round(c["round_trips"] / IDLE_SECONDS, 1)
                    for owner, c in idle_proxy.items()
                },
                "commands_executed": round(sum(idle_stats.values()) / IDLE_SECONDS, 1),
            },
            "method": (
                "round trips and top-level commands: a counting TCP proxy in front of Redis "
                "for every worker connection; executed commands (scripts' and transactions' "
                "inner commands included): INFO commandstats before/after, the harness's "
                "XADDs and INFO left out"
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
    details = result["details"]
    for owner, s in details["round_trips_per_result"].items():
        print(f"round trips per result, {owner:<14} {s['median']:6.2f}")
    executed = details["commands_executed_per_result"]["median"]
    print(f"commands executed per result        {executed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
