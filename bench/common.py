"""What the figure modules share: the summary of repeated runs, the correctness check that
refuses a run which lost or doubled a result, and `Stack`, the system a run measures.

    with Stack(latency=0.02) as stack:
        worker = stack.start_worker("w0", concurrency=2, pool="prefork")
        expected = stack.submit(stack.batch(1500))        # XADD to the ingest stream
        stats = stack.wait_landed(expected, timeout=120)  # every PATCH at the stand-in
        check_landed(patch_counts(stats), expected, stored=stored_receipts(stats))

A Stack is a private non-persistent redis-server, the fast stand-in API (bench/standin.py)
in its own process, the credentials of its brands and the environment of fiscal-worker
processes (worker.testing), all stopped at exit. Bare Celery workers (bench/bare_app.py)
start against the same Redis and stand-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from worker import keys
from worker.testing import RedisServer, WorkerProcess, wait_for, worker_env, write_credentials

ROOT = Path(__file__).resolve().parent.parent
BRANDS = ("bench-a", "bench-b")
INTEGRATOR = "bench-integrator"
STREAM = "fiscal:results"  # FISCAL_INGEST_STREAM's default (docs/interface.md, Ingest)
STANDIN_START_SECONDS = 10.0
# The worker's rate budget in every benchmark that does not measure the budget: far above
# anything a run sends, over a short window so its log of calls stays production-sized; the
# stand-in advertises the same (bench/standin.py, UNLIMITED).
FAR_BUDGET = {"FISCAL_RATE_LIMIT_REQUESTS": "1000000", "FISCAL_RATE_LIMIT_WINDOW_SECONDS": "1"}
# fiscal-worker's own log level in the benchmarks: production's default.
WORKER_LOG_LEVEL = "INFO"

Key = tuple[str, int]  # (brand, receipt_id)


class Incorrect(Exception):
    """A run lost or doubled a result (or left one unfinished): its figure is not reported."""


def summary(values: Iterable[float]) -> dict[str, Any]:
    """{"median", "min", "max", "runs"} of repeated measurements."""
    runs = [float(v) for v in values]
    if not runs:
        raise ValueError("no runs to summarise")
    return {
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "runs": runs,
    }


def check_landed(
    patches: Mapping[Key, int],
    expected: Mapping[Key, str] | set[Key],
    *,
    stored: Mapping[Key, tuple[str | None, bool]] | None = None,
) -> None:
    """Every expected receipt PATCHed exactly once and nothing else PATCHed; with `stored`
    (what the API holds now) and `expected` mapping each receipt to its fiscal id, each one
    holds that fiscal id and lock=true. Raises Incorrect with what is wrong."""
    wanted = set(expected)
    missing = sorted(wanted - {k for k, n in patches.items() if n > 0})
    doubled = sorted(k for k, n in patches.items() if n > 1)
    strays = sorted(set(patches) - wanted)
    problems = []
    if missing:
        problems.append(f"{len(missing)} never PATCHed (e.g. {missing[:3]})")
    if doubled:
        problems.append(f"{len(doubled)} PATCHed more than once (e.g. {doubled[:3]})")
    if strays:
        problems.append(f"{len(strays)} PATCHed but not in the run (e.g. {strays[:3]})")
    if stored is not None and isinstance(expected, Mapping):
        wrong = sorted(k for k, f in expected.items() if tuple(stored.get(k, ())) != (f, True))
        if wrong:
            problems.append(f"{len(wrong)} without their fiscal_id and lock (e.g. {wrong[:3]})")
    if problems:
        raise Incorrect("; ".join(problems))


def _key(text: str) -> Key:
    brand, _, receipt = text.rpartition(":")
    return brand, int(receipt)


def patch_counts(stats: Mapping[str, Any]) -> dict[Key, int]:
    """The stand-in's PATCH count per (brand, receipt_id)."""
    return {_key(k): int(n) for k, n in stats["patches"].items()}


def stored_receipts(stats: Mapping[str, Any]) -> dict[Key, tuple[str | None, bool]]:
    """What the stand-in holds per (brand, receipt_id): (fiscal_id, lock)."""
    return {_key(k): (v[0], bool(v[1])) for k, v in stats["receipts"].items()}


class Standin:
    """The stand-in API process (bench/standin.py) and its control routes."""

    def __init__(self, log_path: Path, **options: Any) -> None:
        args = [sys.executable, "-m", "bench.standin", "--port", "0"]
        for name, value in options.items():
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self._ready_line()
        self.url = line.rsplit(" ", 1)[1]
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def _ready_line(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + STANDIN_START_SECONDS
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("standin ready "):
                return line.strip()
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the stand-in API did not start (log: {self.log_path})")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_stats").raise_for_status().json()

    def progress(self) -> dict[str, Any]:
        return self.http.get("/_progress").raise_for_status().json()

    def reset(self) -> None:
        self.http.post("/_reset").raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if hasattr(self, "http"):
            self.http.close()
        self.log.close()


class BareWorker:
    """`celery -A bench.bare_app worker` against a Stack's Redis and stand-in."""

    def __init__(self, stack: Stack, name: str, concurrency: int, pool: str) -> None:
        self.log_path = stack.directory / f"{name}.log"
        env = {
            **stack.env,
            "BENCH_BROKER_URL": stack.redis_server.url,
            "BENCH_API_URL": stack.standin.url,
            "BENCH_CREDENTIALS_FILE": str(stack.credentials_file),
            "BENCH_INTEGRATOR_ID": INTEGRATOR,
        }
        args = [
            sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker",
            "--pool", pool, "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to its process group (after 30 s, or at
        once for a pool child that outlived its parent)."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


class Stack:
    """A private redis-server (no persistence), the stand-in API, the brands' credentials and
    the workers started on them; everything stopped and deleted at exit."""

    def __init__(
        self,
        *,
        brands: tuple[str, ...] = BRANDS,
        latency: float = 0.0,
        rate_limit: int | None = None,
        rate_window: float | None = None,
        auth_limit: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.brands = brands
        self.standin_options = {
            "latency": latency,
            "rate_limit": rate_limit,
            "rate_window": rate_window,
            "auth_limit": auth_limit,
        }
        self.settings = dict(settings or {})
        self.workers: list[WorkerProcess] = []
        self.bare: list[BareWorker] = []
        self._next_id = 1

    def __enter__(self) -> Stack:
        self._tmp = tempfile.TemporaryDirectory(prefix="fw-bench-")
        self.directory = Path(self._tmp.name)
        try:
            self.redis_server = RedisServer(
                self.directory, secrets.token_urlsafe(16), persistent=False
            )
            self.redis_server.start()
            self.redis = self.redis_server.client()
            self.standin = Standin(self.directory / "standin.log", **self.standin_options)
            creds = {b: (f"client-{b}", f"secret-{b}-{secrets.token_hex(4)}") for b in self.brands}
            self.credentials_file = write_credentials(self.directory / "creds.json", creds)
            self.env = worker_env(
                redis_url=self.redis_server.url,
                clopos_url=self.standin.url,
                integrator_id=INTEGRATOR,
                credentials_file=self.credentials_file,
                settings={"FISCAL_LOG_LEVEL": WORKER_LOG_LEVEL, **self.settings},
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_workers()
        if hasattr(self, "standin"):
            self.standin.stop()
        if hasattr(self, "redis_server"):
            self.redis_server.stop()
        self._tmp.cleanup()

    # --- workers -----------------------------------------------------------------------

    def start_worker(
        self, name: str, concurrency: int = 2, pool: str = "prefork", **env: str
    ) -> WorkerProcess:
        """A fiscal-worker process, started and ready (its service up, Celery's " ready.")."""
        worker = WorkerProcess(
            {**self.env, "FISCAL_HEALTH_FILE": str(self.directory / f"{name}-health.json"), **env},
            self.directory / f"{name}.log",
            name=name,
            concurrency=concurrency,
            pool=pool,
            cwd=ROOT,
        )
        self.workers.append(worker)
        return worker.start()

    def start_bare(self, name: str, concurrency: int, pool: str) -> BareWorker:
        worker = BareWorker(self, name, concurrency, pool)
        self.bare.append(worker)
        return worker

    def stop_workers(self, *, bare_only: bool = False) -> None:
        """Stop the bare Celery workers, and unless `bare_only` the fiscal-worker ones."""
        for bare in self.bare:
            bare.stop()
        self.bare = []
        if not bare_only:
            for worker in self.workers:
                worker.stop()
            self.workers = []

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the ingest consumer group exists and nothing is queued or scheduled."""

        def idle() -> bool:
            groups = self.redis.xinfo_groups(STREAM) if self.redis.exists(STREAM) else []
            busy = self.redis.zcard(keys.SCHEDULE) or self.redis.llen(keys.CELERY_QUEUE)
            return bool(groups) and not busy

        wait_for(idle, timeout=timeout, interval=0.05, what="workers idle")

    # --- results -----------------------------------------------------------------------

    def batch(self, per_brand: int, brands: tuple[str, ...] | None = None) -> dict[Key, str]:
        """Fresh receipts, `per_brand` of each brand (the stack's unless `brands`),
        interleaved: {(brand, id): fiscal_id}."""
        first, self._next_id = self._next_id, self._next_id + per_brand
        return {
            (brand, rid): f"F{rid}-{brand[-1]}"
            for rid in range(first, first + per_brand)
            for brand in (self.brands if brands is None else brands)
        }

    def submit(self, results: Mapping[Key, str]) -> Mapping[Key, str]:
        """XADD one stream entry per result (pipelined, 500 a round trip); returns them."""
        items = list(results.items())
        for start in range(0, len(items), 500):
            pipe = self.redis.pipeline(transaction=False)
            for (brand, rid), fiscal_id in items[start : start + 500]:
                entry = {"receipt_id": rid, "brand": brand, "fiscal_id": fiscal_id}
                pipe.xadd(STREAM, {"data": json.dumps(entry)})
            pipe.execute()
        return results

    def wait_landed(self, expected: Mapping[Key, str], timeout: float) -> dict[str, Any]:
        """Poll the stand-in until every expected receipt has a PATCH (or `timeout`: the run
        lost some, Incorrect), then a short grace for a late double; its /_stats."""
        deadline = time.monotonic() + timeout
        while self.standin.progress()["patched"] < len(expected):
            if time.monotonic() > deadline:
                patched = self.standin.progress()["patched"]
                raise Incorrect(f"{patched} of {len(expected)} landed within {timeout:.0f} s")
            time.sleep(0.05)
        time.sleep(0.3)
        return self.standin.stats()

    def check_finished(self, timeout: float = 10.0) -> None:
        """fiscal-worker's own books after a run: within `timeout` nothing is left scheduled
        (a result leaves the schedule right after its PATCH's answer), nothing dead-lettered."""
        deadline = time.monotonic() + timeout
        while self.redis.zcard(keys.SCHEDULE) and time.monotonic() < deadline:
            time.sleep(0.05)
        scheduled = self.redis.zcard(keys.SCHEDULE)
        dead = self.redis.zcard(keys.DLQ_INDEX)
        if scheduled or dead:
            raise Incorrect(f"{scheduled} results still scheduled, {dead} dead-lettered")


# --- plots (matplotlib: the `bench` extra, imported only when a plot is drawn) -----------


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (its folder made) and let it go."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
