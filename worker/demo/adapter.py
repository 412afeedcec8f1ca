"""`fiscal-worker adapter-sim`: an adapter that keeps sending results (the compose demo).

What an adapter beside a fiscal device does, at a steady pace, until it is stopped: a sale
closes, the device prints, the adapter hands the result to the worker. With a fake Clopos
API (`--fake-clopos URL`) the closed receipt is first created there, through the fake's
control endpoint `POST /_fake/receipts` (worker/fake_clopos/), so the worker has a receipt to
fiscalise; then the result goes to the ingest stream with `worker.ingest_format.submit`
(docs/interface.md, Ingest), exactly as a Python adapter writes it.

Receipt ids count up from `start_id` (by default the clock: unix seconds * 100, so a restart
never reuses an id at up to MAX_RATE results a second); brands are taken in turn. Each
result carries its own `result_id`, so a result resent after a failure is one result.

Every wait is bounded: the pace (at most 1 / MIN_RATE), the pause after a failed call
(RETRY_SECONDS), each HTTP call (HTTP_TIMEOUT_SECONDS) and each Redis command (the client's
socket timeout). Redis or the fake being unreachable is waited out (the same result again);
a fake that refuses a receipt (unknown brand) is an error that stops the run.
`run_until_signalled` runs it in a thread and stops it on SIGTERM or SIGINT: the result in
hand is finished or not sent at all, never half-sent.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from worker.ingest_format import InvalidMessage, submit, to_rfc3339
from worker.logs import kv

log = logging.getLogger("fiscal.adapter_sim")

MIN_RATE = 0.1  # results per second: the longest pause between two is 10 s
MAX_RATE = 50.0  # and the most: default receipt ids leave 100 per second of clock
START_IDS_PER_SECOND = 100  # default first receipt id: unix seconds * this
RETRY_SECONDS = 2.0  # after a failed call, the same result again
HTTP_TIMEOUT_SECONDS = 5.0  # one call to the fake's control API
MAX_LAG_SECONDS = 1.0  # further behind schedule (after an outage): restart the pace, no burst
JOIN_SECONDS = 0.5  # how often the main thread wakes while the simulator runs
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SimError(Exception):
    """A failure that waiting does not fix; str() is one line."""


class _Retry(Exception):
    """A failure worth the same result again after RETRY_SECONDS."""


@dataclass(frozen=True)
class SimConfig:
    brands: tuple[str, ...] = ("openapitest",)
    rate: float = 1.0  # results per second
    count: int | None = None  # stop after this many; None: until stopped
    start_id: int | None = None  # the first receipt id; None: from the clock
    stream: str = "fiscal:results"  # FISCAL_INGEST_STREAM
    device_id: str = "adapter-sim"

    def __post_init__(self) -> None:
        if not self.brands:
            raise ValueError("at least one brand")
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise ValueError(f"rate must be within {MIN_RATE}..{MAX_RATE} results a second")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.start_id is not None and self.start_id < 1:
            raise ValueError("start_id must be at least 1")


class AdapterSim:
    """Sends `config.count` results (or until `stop()`), one every 1 / `config.rate` s."""

    def __init__(
        self,
        redis_client: redis.Redis,
        config: SimConfig,
        *,
        fake: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.config = config
        self.fake = fake
        self.clock = clock
        self.retry_seconds = retry_seconds
        self.first_id = config.start_id or int(clock() * START_IDS_PER_SECOND)
        self.sent = 0  # results written to the stream
        self.error: str | None = None  # why the run stopped early, if it did
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def result(self, index: int) -> dict[str, Any]:
        """The `index`-th result: submit()'s keyword arguments."""
        brand = self.config.brands[index % len(self.config.brands)]
        receipt_id = self.first_id + index
        return {
            "brand": brand,
            "receipt_id": receipt_id,
            "fiscal_id": f"SIM{receipt_id}",
            "device_id": self.config.device_id,
            "result_id": f"sim-{brand}-{receipt_id}",
        }

    def run(self) -> None:
        """Send until stopped or `count` is reached; a SimError ends it with `error` set."""
        started = time.monotonic()
        index = 0
        fake = str(self.fake.base_url) if self.fake is not None else None
        log.info(
            kv(
                "adapter_sim_start",
                brands=",".join(self.config.brands),
                rate=self.config.rate,
                first_receipt_id=self.first_id,
                fake=fake,
            )
        )
        try:
            while not self._stop.is_set():
                if self.config.count is not None and index >= self.config.count:
                    break
                delay = started + index / self.config.rate - time.monotonic()
                if delay < -MAX_LAG_SECONDS:
                    started, delay = time.monotonic() - index / self.config.rate, 0.0
                if delay > 0 and self._stop.wait(delay):
                    break
                if self._send(self.result(index)):
                    index += 1
                elif self._stop.wait(self.retry_seconds):
                    break
        except SimError as exc:
            self.error = str(exc)
            log.error(kv("adapter_sim_failed", error=self.error))
        log.info(kv("adapter_sim_stop", sent=self.sent))

    def _send(self, fields: dict[str, Any]) -> bool:
        """One result: its receipt on the fake (if any), then the stream entry. False: retry."""
        where = {"brand": fields["brand"], "receipt_id": fields["receipt_id"]}
        try:
            if self.fake is not None:
                self._create_receipt(fields["brand"], fields["receipt_id"])
            entry_id = submit(
                self.redis,
                stream=self.config.stream,
                printed_at=to_rfc3339(self.clock()),
                **fields,
            )
        except InvalidMessage as exc:
            raise SimError(f"not a valid result: {exc}") from None
        except _Retry as exc:
            problem = str(exc)
        except httpx.HTTPError as exc:
            problem = f"fake Clopos: {type(exc).__name__}"
        except redis.exceptions.RedisError as exc:  # never its text: it may quote the URL
            problem = f"Redis: {type(exc).__name__}"
        else:
            self.sent += 1
            log.info(kv("adapter_sim_sent", **where, rid=entry_id))
            return True
        log.warning(kv("adapter_sim_retry", **where, error=problem))
        return False

    def _create_receipt(self, brand: str, receipt_id: int) -> None:
        """A closed receipt without a fiscal id, as a POS leaves it when the sale closes."""
        assert self.fake is not None
        response = self.fake.post(
            "/_fake/receipts", json={"brand": brand, "receipt": {"id": receipt_id}}
        )
        if response.status_code >= 500:
            raise _Retry(f"fake Clopos: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict) or not body.get("success"):
            message = body.get("message") if isinstance(body, dict) else None
            raise SimError(
                f"the fake Clopos API refused receipt {receipt_id} of brand {brand!r}: "
                f"HTTP {response.status_code}" + (f" ({message})" if message else "")
            )


def fake_client(base_url: str) -> httpx.Client:
    """A client for the fake Clopos API's control endpoints."""
    return httpx.Client(base_url=base_url.rstrip("/"), timeout=HTTP_TIMEOUT_SECONDS)


def run_until_signalled(sim: AdapterSim, signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Run `sim` in a thread until it ends or one of `signals` arrives (then stop it).

    Call from the main thread (signal handlers live there). The handlers only set the
    simulator's stop event, and the main thread never holds that event's lock (it waits in
    join), so a signal can never deadlock it; the previous handlers are restored on return.
    """
    previous = {sig: signal.signal(sig, lambda *_: sim.stop()) for sig in signals}
    thread = threading.Thread(target=sim.run, name="adapter-sim", daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(JOIN_SECONDS)
    finally:
        sim.stop()
        thread.join(JOIN_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
