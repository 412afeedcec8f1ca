"""Is this worker working? Its main process says so in a small file; a probe reads it.

A live process is not a working worker: a Redis call that never returns or a stuck loop
leaves the process up and doing nothing. So every loop of the worker marks its progress
once per iteration (`Pulse.mark`): the ingest, dispatch, heartbeat and sweep loops
(worker/service.py) and Celery's own event loop (a timer of a consumer bootstep,
worker/app.py). The heartbeat loop writes every mark to the health file
(FISCAL_HEALTH_FILE) each beat, atomically (a temporary file renamed over it).

    python -m worker.health live    exit 0: the file was written within LIVE_SECONDS (or
                                    three heartbeats, if longer) and every loop progressed
                                    within that; or the worker is in its warm shutdown
                                    (up to STOPPING_SECONDS). `--within S` for another bound
    python -m worker.health ready   live, and Redis answered the heartbeat within
                                    READY_REDIS_SECONDS (or three heartbeats, if longer)

Exit 1 with one line saying which loop is stuck (or the file is missing, stale or
unreadable). An iteration that failed (Redis down) still counts as progress, and Celery's
consumer is not judged while Redis does not answer (it waits in its reconnect loop):
restarting a worker does not bring Redis back; readiness says Redis is unreachable.

The probe imports nothing but the standard library: it runs every few seconds in the pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_FILE = str(Path(tempfile.gettempdir()) / "fiscal-worker-health.json")
LIVE_SECONDS = 120.0  # far above any loop's iteration (Redis calls time out in seconds)
READY_REDIS_SECONDS = 30.0  # three heartbeats
STOPPING_SECONDS = 300.0  # warm shutdown: running tasks finish (hard limit 180 s)

# The loops that must progress. "consumer" is Celery's event loop (it reads the queue).
LOOPS = ("ingest", "dispatch", "heartbeat", "sweep", "consumer")


class Pulse:
    """The progress marks of this process's loops, and the file that shows them."""

    def __init__(
        self,
        path: str = DEFAULT_FILE,
        *,
        beat_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.beat_seconds = beat_seconds
        self.clock = clock
        self.started = clock()
        self.marks: dict[str, float] = {}
        self.redis_ok: float | None = None
        self.stopping: float | None = None
        self._lock = threading.Lock()

    def mark(self, loop: str) -> None:
        self.marks[loop] = self.clock()  # one dict store: atomic under the GIL

    def redis_answered(self) -> None:
        self.redis_ok = self.clock()

    def stop(self) -> None:
        self.stopping = self.clock()
        self.write()

    def write(self) -> None:
        doc = {
            "pid": os.getpid(),
            "written": self.clock(),
            "beat_seconds": self.beat_seconds,
            "started": self.started,
            "marks": dict(self.marks),
            "redis_ok": self.redis_ok,
            "stopping": self.stopping,
        }
        folder = os.path.dirname(self.path) or "."
        with self._lock:
            fd, tmp = tempfile.mkstemp(prefix=".health-", dir=folder)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(doc, handle)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def check(
    doc: dict[str, Any], now: float, *, ready: bool, within: float = LIVE_SECONDS
) -> str | None:
    """None when the worker is live (and ready, if asked); else why not."""
    stopping = doc.get("stopping")
    if isinstance(stopping, int | float):
        if now - stopping <= STOPPING_SECONDS:
            return "stopping (warm shutdown)" if ready else None
        return f"stopping for {now - stopping:.0f}s, longer than {STOPPING_SECONDS:.0f}s"
    beat = doc.get("beat_seconds")
    # A worker configured with a slow heartbeat gets three of its beats.
    bound = max(within, 3 * beat) if isinstance(beat, int | float) else within
    written = doc.get("written")
    if not isinstance(written, int | float) or now - written > bound:
        return "health file not written for too long: the heartbeat loop is stuck"
    marks = doc.get("marks") or {}
    started = doc.get("started") if isinstance(doc.get("started"), int | float) else written
    redis_ok = doc.get("redis_ok")
    if not isinstance(redis_ok, int | float):
        redis_ok = None
    for loop in LOOPS:
        at = marks.get(loop, started)  # a loop not started yet has had since the start
        if not isinstance(at, int | float):
            return f"the {loop} loop has an unreadable mark"
        if now - at <= bound:
            continue
        if loop == "consumer" and (redis_ok is None or redis_ok - at <= bound):
            # Redis has not answered for long since Celery's consumer last moved: it waits
            # in its reconnect loop, its timer cancelled. Waiting, not hanging (and a
            # restart would not bring Redis back).
            continue
        return f"the {loop} loop made no progress for {now - at:.0f}s"
    if ready:
        redis_bound = READY_REDIS_SECONDS
        if isinstance(beat, int | float):
            redis_bound = max(READY_REDIS_SECONDS, 3 * beat)
        if redis_ok is None or now - redis_ok > redis_bound:
            return "Redis has not answered the heartbeat lately"
    return None


def probe(
    path: str, *, ready: bool, within: float = LIVE_SECONDS, now: float | None = None
) -> str | None:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no health file at {path}: the worker has not started its loops"
    except (OSError, ValueError) as exc:
        return f"unreadable health file {path}: {exc.__class__.__name__}"
    if not isinstance(doc, dict):
        return f"unreadable health file {path}"
    return check(doc, time.time() if now is None else now, ready=ready, within=within)


USAGE = "usage: python -m worker.health live|ready [--within SECONDS]"


def main(argv: list[str]) -> int:
    within = LIVE_SECONDS
    if len(argv) == 3 and argv[1] == "--within":
        try:
            within = float(argv[2])
        except ValueError:
            within = -1.0
        argv = argv[:1]
    if len(argv) != 1 or argv[0] not in ("live", "ready") or not within > 0:
        print(USAGE, file=sys.stderr)
        return 2
    path = os.environ.get("FISCAL_HEALTH_FILE") or DEFAULT_FILE
    problem = probe(path, ready=argv[0] == "ready", within=within)
    if problem is None:
        print(argv[0])
        return 0
    print(f"not {argv[0]}: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
