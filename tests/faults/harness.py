"""Helpers of the fault suite: process trees and their memory, the worker's log, timing."""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
from support import closed

from worker.testing import RedisServer, WorkerProcess, wait_for

# The worker's lease settings, as FAST (tests/integration/conftest.py) shortens them.
LEASE_VARIABLES = (
    "FISCAL_RUN_LEASE_SECONDS",
    "FISCAL_QUEUE_LEASE_SECONDS",
    "FISCAL_WORKER_LEASE_SECONDS",
    "FISCAL_WORKER_HEARTBEAT_SECONDS",
    "FISCAL_RECEIPT_LOCK_SECONDS",
    "FISCAL_CLAIM_IDLE_SECONDS",
)
# FAST's bound on a result's life (120 s); a case with its own retry windows drops it, so
# the deadline is the worker's default: the longer of those windows.
DEADLINE_VARIABLE = "FISCAL_RESULT_DEADLINE_SECONDS"
_TASK_EVENT = re.compile(
    r"Task fiscal\.fiscalise\[(?P<rid>[^\]]+)\] (?P<event>received|succeeded|retry|raised)"
)


def budget(fake: Any, requests: int, window: float) -> dict[str, str]:
    """Give the fake this per-brand budget; returns the workers' matching settings."""
    fake.rate_limit, fake.rate_window = requests, window
    return {
        "FISCAL_RATE_LIMIT_REQUESTS": str(requests),
        "FISCAL_RATE_LIMIT_WINDOW_SECONDS": str(window),
    }


def wide_budget(fake: Any) -> dict[str, str]:
    """A budget no case reaches unless it means to: 1200 calls a minute per brand."""
    return budget(fake, 1200, 60.0)


def two_workers_on_a_slow_api(
    fake: Any, start_worker: Any, brand: str, receipts: Iterable[int], latency: float
) -> tuple[Any, Any]:
    """Closed receipts `receipts` of `brand` on a fake whose GET and PATCH take `latency`
    seconds, and two workers (w1, w2) of 4 processes each with a budget no case reaches."""
    for rid in receipts:
        fake.add_receipt(brand, closed(rid))
    fake.set_latency(latency, method="GET")
    fake.set_latency(latency, method="PATCH")
    wide = wide_budget(fake)
    return start_worker("w1", concurrency=4, **wide), start_worker("w2", concurrency=4, **wide)


def until(deadline: float) -> None:
    """Wait out a fault's duration: poll the clock until `deadline` (time.monotonic())."""
    wait_for(
        lambda: time.monotonic() >= deadline, timeout=max(0.0, deadline - time.monotonic()) + 5
    )


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the prefork pool of a worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after the ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss(worker: WorkerProcess) -> dict[str, float]:
    """RSS of the worker's main process and its pool children (MiB): main, children (sum),
    largest child, total, and how many children there were."""
    assert worker.process is not None
    main = worker.process.pid
    pool = [rss_mib(child) for child in children(main)]
    main_rss = rss_mib(main)
    return {
        "main": main_rss,
        "children": sum(pool),
        "largest_child": max(pool, default=0.0),
        "total": main_rss + sum(pool),
        "pool": len(pool),
    }


def alive(worker: WorkerProcess) -> bool:
    return worker.alive()


def task_events(log: str) -> dict[str, str]:
    """The last Celery task event (received / succeeded / retry / raised) per result id."""
    last: dict[str, str] = {}
    for match in _TASK_EVENT.finditer(log):
        last[match["rid"]] = match["event"]
    return last


def held_by(worker: WorkerProcess) -> set[str]:
    """Result ids whose task the worker has received and not finished (per its log)."""
    return {rid for rid, event in task_events(worker.log()).items() if event == "received"}


def lines_about(workers: Iterable[WorkerProcess], brand: str, receipt_id: int) -> list[str]:
    """The workers' log lines about one receipt (and its tasks), for a failure message."""
    needle = f"receipt_id={receipt_id}"
    rids: set[str] = set()
    out: list[str] = []
    for worker in workers:
        for line in worker.log().splitlines():
            if f"brand={brand}" in line and (needle + " " in line or line.endswith(needle)):
                out.append(f"{worker.name}: {line[:300]}")
                found = re.search(r"rid=(\S+)", line)
                if found:
                    rids.add(found[1])
    for worker in workers:
        for line in worker.log().splitlines():
            if any(f"[{rid}]" in line for rid in rids):
                out.append(f"{worker.name}: {line[:300]}")
    return out


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def first_patch_at(fake: Any, brand: str, receipt_id: int) -> float | None:
    times = fake.stats()["receipts"].get(f"{brand}:{receipt_id}", {}).get("patched_at", [])
    return times[0] if times else None


def fiscalised_count(fake: Any, brand: str, receipt_ids: Iterable[int]) -> int:
    return sum(1 for rid in receipt_ids if (fake.receipt(brand, rid) or {}).get("lock"))


class TlsRedisServer(RedisServer):
    """A private redis-server that listens only on a TLS port (rediss://); AOF, fsynced
    every second."""

    def __init__(self, directory: Path, password: str, certs: dict[str, Path]) -> None:
        super().__init__(directory, password)
        self.certs = certs

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self, decode: bool = True, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(
            self.url, decode_responses=decode, ssl_ca_certs=str(self.certs["ca"]), **options
        )

    def config(self, binary: str) -> dict[str, str]:
        directives = super().config(binary)
        del directives["appendfsync"]
        return directives | {
            "port": "0",
            "tls-port": str(self.port),
            "tls-cert-file": str(self.certs["cert"]),
            "tls-key-file": str(self.certs["key"]),
            "tls-ca-cert-file": str(self.certs["ca"]),
            "tls-auth-clients": "no",
        }


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    commands = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=fault-suite-ca"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext)],
    ]  # fmt: skip
    for command in commands:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default
