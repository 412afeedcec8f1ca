"""An in-process deployment for burst-style tests: fakeredis, a test clock, and a fake
Clopos behind `httpx.MockTransport`, run until idle (the way Dramatiq's `stub_broker.join()`
or arq's `burst=True` tests run).

    bench = Burst(limit=20, window=5)
    bench.add_receipt(7)                      # closed, no fiscal_id
    bench.send(7, "F-7")                      # recorded and due now, as ingest does
    bench.xadd({"receipt_id": 7, ...})        # or a stream entry, as an adapter writes it
    bench.run()                               # poll -> admit -> run tasks -> move the clock,
                                              # until idle
    assert bench.api.patches(7) == [{"fiscal_id": "F-7", "lock": True}]

Time is the clock's: the pipeline's short waits move it instead of sleeping, and when nothing
is due the clock jumps to the next due result. The fake API counts its sliding-window budget
on the same clock and answers 429 with `RateLimit-*` headers past it.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import httpx
from support import Clock

from worker import keys
from worker.audit import AuditTrail
from worker.breaker import CircuitBreaker, FailedCallGuard
from worker.clopos.auth import AuthCaller
from worker.clopos.client import CloposClient
from worker.clopos.tokens import TokenProvider
from worker.clopos.wire import Wire
from worker.dispatcher import Dispatcher
from worker.dlq import DeadLetterStore
from worker.ingest import IngestConsumer
from worker.pipeline import Fiscaliser, Outcome
from worker.ratelimit import AuthBudget, BrandBudget, RatePolicy
from worker.retry import RetryPolicy
from worker.settings import BrandCredentials
from worker.store import ResultStore
from worker.telemetry import Telemetry

BRAND = "b1"
STREAM = "fiscal:results"
Hook = Callable[["FakeApi", httpx.Request, int], httpx.Response | None]


@dataclass
class Call:
    at: float
    method: str
    receipt_id: int | None
    status: int
    body: dict[str, Any] | None = None


@dataclass
class FakeApi:
    """Receipts of one brand, a sliding-window budget, calls recorded with their time."""

    clock: Clock
    limit: int
    window: float
    receipts: dict[int, dict[str, Any]] = field(default_factory=dict)
    appear_at: dict[int, float] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)  # may answer a request instead
    tokens_issued: int = 0
    _log: deque[float] = field(default_factory=deque)

    def handle(self, request: httpx.Request) -> httpx.Response:
        now = self.clock()
        if request.url.path.endswith("/v2/auth"):
            self.tokens_issued += 1
            self.calls.append(Call(now, "AUTH", None, 200))
            for hook in list(self.hooks):
                answer = hook(self, request, 0)
                if answer is not None:
                    return answer
            return httpx.Response(
                200,
                json={"success": True, "token": f"tok-{self.tokens_issued}", "expires_in": 3600},
            )
        receipt_id = int(request.url.path.rsplit("/", 1)[1])
        body = json.loads(request.content) if request.content else None
        while self._log and self._log[0] <= now - self.window:
            self._log.popleft()
        if len(self._log) >= self.limit:
            reset = max(1, math.ceil(self._log[0] + self.window - now))
            self.calls.append(Call(now, request.method, receipt_id, 429, body))
            return httpx.Response(
                429,
                json={"success": False, "error": "too_many_requests"},
                headers=self._headers(0, reset),
            )
        self._log.append(now)
        headers = self._headers(self.limit - len(self._log), 1)
        for hook in list(self.hooks):
            answer = hook(self, request, receipt_id)
            if answer is not None:
                self.calls.append(Call(now, request.method, receipt_id, answer.status_code, body))
                for name, value in headers.items():
                    answer.headers.setdefault(name, value)  # a hook's own headers win
                return answer
        receipt = self.receipts.get(receipt_id)
        if receipt is None or self.appear_at.get(receipt_id, 0) > now:
            self.calls.append(Call(now, request.method, receipt_id, 404, body))
            return httpx.Response(
                404, json={"success": False, "error": "not_found"}, headers=headers
            )
        if request.method == "PATCH":
            receipt.update(body or {})
        self.calls.append(Call(now, request.method, receipt_id, 200, body))
        return httpx.Response(200, json={"success": True, "data": dict(receipt)}, headers=headers)

    def _headers(self, remaining: int, reset: int) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset),
        }

    def of(self, receipt_id: int, method: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.receipt_id == receipt_id and (method is None or c.method == method)
        ]

    def patches(self, receipt_id: int) -> list[dict[str, Any]]:
        return [c.body or {} for c in self.of(receipt_id, "PATCH") if c.status == 200]


class Burst:
    def __init__(
        self,
        *,
        limit: int = 300,
        window: float = 60.0,
        transient_window: float = 600.0,
        not_ready_window: float = 600.0,
        lock_seconds: float = 120.0,
        max_queued: int = 500,
    ) -> None:
        self.clock = Clock()
        server = fakeredis.FakeServer()
        self.r = fakeredis.FakeRedis(server=server, decode_responses=True)
        self.raw = fakeredis.FakeRedis(server=server, decode_responses=False)
        self.api = FakeApi(self.clock, limit, window)
        credentials = {BRAND: BrandCredentials(client_id="cid", client_secret="secret-0001")}
        wire = Wire(
            "https://clopos.test/open-api",
            http=httpx.Client(transport=httpx.MockTransport(self.api.handle)),
            on_answer=Telemetry(self.r).api_answer,  # as worker/runtime.py wires it
        )
        auth = AuthCaller(wire, integrator_id="integrator", credentials=credentials)
        tokens = TokenProvider(
            self.r,
            auth.authenticate,
            auth_budget=AuthBudget(self.r, clock=self.clock),
            clock=self.clock,
            sleep=self.sleep,
        )
        self.client = CloposClient(wire, tokens)
        rate = RatePolicy(limit=limit, window=window)
        self.policy = RetryPolicy(
            transient_window=transient_window,
            not_ready_window=not_ready_window,
            transient_cap=5.0,
            not_ready_cap=2.0,
        )
        self.store = ResultStore(
            self.r, rate=rate, lifetime=max(transient_window, not_ready_window)
        )
        self.dlq = DeadLetterStore(self.r)
        self.audit = AuditTrail(self.r, ttl_seconds=3600, max_attempts=50)
        self.fiscaliser = Fiscaliser(
            redis_client=self.r,
            store=self.store,
            client=self.client,
            credentials=credentials,
            dlq=self.dlq,
            audit=self.audit,
            policy=self.policy,
            budget=BrandBudget(self.r, rate, clock=self.clock),
            breaker=CircuitBreaker(self.r, clock=self.clock),
            guard=FailedCallGuard(self.r, clock=self.clock),
            lock_seconds=lock_seconds,
            clock=self.clock,
            sleep=self.sleep,
        )
        self.queue: deque[tuple[str, int]] = deque()
        self.max_queued = max_queued
        self.dispatcher = Dispatcher(
            self.store,
            self._publish,
            lambda: len(self.queue),
            max_queued=max_queued,
            dlq=self.dlq,
            clock=self.clock,
        )
        self.ingest = IngestConsumer(
            redis_client=self.raw,
            stream=STREAM,
            consumer="burst-1",
            store=self.store,
            dlq=self.dlq,
            audit=self.audit,
            publish=self._publish,
            queue_has_room=lambda: len(self.queue) < self.max_queued,
            block_ms=1,
            clock=self.clock,
        )
        self.ingest.ensure_group()
        self.published = 0  # messages put on the queue, by ingest or the dispatcher
        self.deepest_queue = 0
        self.arrivals: list[tuple[float, int, str]] = []  # (at, receipt_id, fiscal_id)
        self.sent: dict[str, tuple[int, str]] = {}  # rid -> (receipt_id, fiscal_id)
        self.outcomes: list[tuple[str, Outcome]] = []
        self._seq = 0

    def sleep(self, seconds: float) -> None:
        self.clock.now += max(0.0, seconds)

    def _publish(self, rid: str, dispatch: int, brand: str, receipt_id: str) -> None:
        self.queue.append((rid, dispatch))
        self.published += 1
        self.deepest_queue = max(self.deepest_queue, len(self.queue))

    def xadd(self, data: dict[str, Any] | str | bytes) -> str:
        """Append one stream entry, as an adapter does (a dict is written as JSON)."""
        raw = json.dumps(data) if isinstance(data, dict) else data
        entry_id = self.raw.xadd(STREAM, {"data": raw})
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def add_receipt(self, receipt_id: int, appear_after: float = 0.0, **fields: Any) -> None:
        receipt = {
            "id": receipt_id,
            "status": 2,
            "closed_at": "2026-12-01 12:00:00",
            "fiscal_id": None,
            "lock": False,
        }
        receipt.update(fields)
        self.api.receipts[receipt_id] = receipt
        if appear_after:
            self.api.appear_at[receipt_id] = self.clock() + appear_after

    def send(self, receipt_id: int, fiscal_id: str, brand: str = BRAND) -> str:
        """Record one result, due now (what the ingest consumer does for a valid entry)."""
        self._seq += 1
        rid = f"{int(self.clock() * 1000)}-{self._seq}"
        result = {"receipt_id": receipt_id, "brand": brand, "fiscal_id": fiscal_id}
        assert self.store.create(
            rid, result, json.dumps(result), score=self.clock(), now=self.clock()
        )
        self.sent[rid] = (receipt_id, fiscal_id)
        return rid

    def feed(self, at: float, receipt_id: int, fiscal_id: str) -> None:
        """Send this result when the clock reaches `at` (seconds from now)."""
        self.arrivals.append((self.clock() + at, receipt_id, fiscal_id))
        self.arrivals.sort()

    def run(self, max_steps: int = 100_000, until: float | None = None) -> None:
        """Admit, run the published tasks in order, and move the clock when nothing is due;
        until nothing is left (or the clock passes `until`)."""
        for _ in range(max_steps):
            while self.arrivals and self.arrivals[0][0] <= self.clock():
                _, receipt_id, fiscal_id = self.arrivals.pop(0)
                self.send(receipt_id, fiscal_id)
            if self.ingest.poll():
                continue
            self.dispatcher.run_once()
            if self.queue:
                rid, dispatch = self.queue.popleft()
                self.outcomes.append((rid, self.fiscaliser.run(rid, dispatch)))
                continue
            upcoming = self.r.zrange(keys.SCHEDULE, 0, 0, withscores=True)
            moments = [score for _, score in upcoming] + [a[0] for a in self.arrivals[:1]]
            if not moments:
                return
            if until is not None and min(moments) > until:
                return
            self.clock.now = max(self.clock.now, min(moments))
        raise AssertionError("the deployment did not go idle")

    def stream_left(self) -> int:
        """Entries still in the stream (settled ones are acknowledged and deleted)."""
        return int(self.raw.xlen(STREAM))

    def unfinished(self) -> int:
        return int(self.r.zcard(keys.SCHEDULE))

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.dlq.list(limit=10_000)
