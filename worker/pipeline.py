"""One run of one result: from its stored record to fiscalised, parked or dead-lettered.

Follow a result top to bottom in `Fiscaliser.run`:
  begin (only the current dispatch runs) -> deadline -> credentials -> receipt lock, taken
  in one step with the fiscalised marker read -> GET -> decide() -> PATCH -> finish (the
  lock released in its transaction); every failure class has one handler.
Around every HTTP request the client calls the run's gate (`_RunGate`):
  before the call  the failed-call guard (for results that failed before), the brand's
                   rate budget (the slot reserved at admission, or one taken ahead of the
                   queue for a result already under way: it sleeps a short wait, or defers
                   the result); and, only when the process holds no token (the call may
                   cost a /v2/auth), the brand's circuit breaker and 429 pause
  before the send  one step (worker/gate.py): this run must still be the result's dispatch
                   and hold the receipt lock (both extended), the circuit must let it call
                   (or it takes the half-open probe), no 429 pause, and the window guard
                   counts it. A run whose lock lapsed takes it again and reads the receipt
                   again before it writes.
  after the answer the budget learns others' use and the breaker the outcome, with the
                   call's audit attempt, in one round trip; a GET's rides with the PATCH's
                   gate (or the run's end).
Every write of a run (park, finish, dead-letter) is fenced on its dispatch number
(`ResultStore.fenced`): a run that lost its result writes nothing (Superseded).
The Celery task (tasks/fiscalise.py) is a thin shell that maps the Outcome to a task state.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from worker import keys, telemetry
from worker.audit import AuditTrail
from worker.audit_events import AuditEvents
from worker.breaker import CircuitBreaker, FailedCallGuard, Transition
from worker.clopos.client import CloposClient
from worker.clopos.tokens import FAILURE_MEMORY_SECONDS
from worker.decide import Action, confirms, decide
from worker.dlq import DeadLetterStore, Reason
from worker.errors import (
    AuthError,
    CloposError,
    Deferred,
    NotReadyError,
    PermanentError,
    RateLimitedError,
    RateLimitInfo,
    TransientError,
)
from worker.gate import Answered, Attempt, RequestGate
from worker.idempotency import IN_FLIGHT_SECONDS, ReceiptLock
from worker.ingest_format import parse_rfc3339, to_rfc3339
from worker.logs import kv
from worker.ratelimit import BrandBudget
from worker.retry import RetryPolicy
from worker.settings import BrandCredentials
from worker.store import Begin, Damaged, ResultRecord, ResultStore, Superseded
from worker.telemetry import RetryClass, Since, Telemetry, Wait

log = logging.getLogger(__name__)

BUSY_RECEIPT_WAIT_SECONDS = 1.0  # another worker holds the receipt: look again shortly
GUARD_SPREAD_SECONDS = 20.0  # results held by the failed-call guard resume spread this wide
LEASE_SPARE_SECONDS = 5.0  # a wait ending this close to the lease's end renews it first
LOCK_REGAINS = 2  # a run whose receipt lock lapsed takes it again (and re-reads) this often


class LockLost(Exception):
    """The receipt lock lapsed before a send: nothing was sent."""


@dataclass
class _Run:
    """One execution of one result: its receipt lock, which call comes next, if it is a
    probe, and when its last request was counted in the brand's window."""

    record: ResultRecord
    lock: ReceiptLock
    calls: int = 0
    probe: bool = False
    sent: float = 0.0
    keep_lock: bool = False  # a PATCH of unknown outcome: the lock expires on its own
    released: bool = False  # the lock went with the run's finish
    leased_until: float = 0.0  # the result's lease lasts at least this long (unix s)
    answered: Answered | None = None  # its last call, recorded with the next round trip


class _RunGate:
    """The client's CallGate for one run (worker/clopos/client.py calls it around each request)."""

    def __init__(self, fiscaliser: Fiscaliser, run: _Run) -> None:
        self.fiscaliser = fiscaliser
        self.run = run

    def before_call(self) -> None:
        self.fiscaliser._gate(self.run)

    def before_send(self) -> None:
        self.fiscaliser._fence(self.run)


class Kind(StrEnum):
    """How one run ended (the task's return value names it; counters are keyed by the
    first three)."""

    FISCALISED = "fiscalised"  # PATCHed: fiscal_id and lock are on the receipt
    ALREADY_DONE = "already_done"  # the receipt carried them already
    DUPLICATE = "duplicate"  # this worker fiscalised the receipt before (its marker)
    DEAD_LETTERED = "dead_lettered"
    PARKED = "parked"  # back in the schedule until `due`
    GONE = Begin.GONE.value  # finished before this delivery
    STALE = Begin.STALE.value  # a newer dispatch owns the result


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    detail: str = ""
    reason: Reason | None = None  # dead-letter reason
    dlq_id: str | None = None
    due: float | None = None  # parked until


class Fiscaliser:
    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        store: ResultStore,
        client: CloposClient,
        credentials: Mapping[str, BrandCredentials],
        dlq: DeadLetterStore,
        audit: AuditTrail,
        policy: RetryPolicy,
        budget: BrandBudget,
        breaker: CircuitBreaker,
        guard: FailedCallGuard,
        lock_seconds: float,
        events: AuditEvents | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.lock_seconds = lock_seconds
        self.redis = redis_client
        self.store = store
        self.client = client
        self.credentials = credentials
        self.dlq = dlq
        self.audit = audit
        self.events = events or AuditEvents()
        self.policy = policy
        self.budget = budget
        self.breaker = breaker
        self.guard = guard
        self.clock = clock
        self.sleep = sleep
        self.telemetry = Telemetry(redis_client)
        self.tokens = client.tokens
        self.gate = RequestGate(
            redis_client,
            breaker=breaker,
            rate=budget.policy,
            audit=audit,
            run_lease=store.run_lease,
        )

    # --- the path of one result -------------------------------------------------------------
    def run(self, rid: str, dispatch: int) -> Outcome:
        began = self.clock()
        begun = self.store.begin(rid, dispatch, began)
        if isinstance(begun, Begin):
            detail = "finished already" if begun is Begin.GONE else "superseded"
            return Outcome(Kind(begun.value), detail)
        try:
            if isinstance(begun, Damaged):
                return self._dead_letter_damaged(begun)
            return self._run(begun, leased_until=began + self.store.run_lease)
        except Superseded:
            # Our lease lapsed and the result was published again: that run owns it now.
            return Outcome(Kind.STALE, "lease lapsed; a newer dispatch runs it")

    def _run(self, record: ResultRecord, *, leased_until: float) -> Outcome:
        if self.clock() >= record.deadline:
            error = f"deadline reached ({to_rfc3339(record.deadline)}); last error: "
            return self._dead_letter(
                record, Reason.RETRIES_EXHAUSTED, error + (record.last_error or "-")
            )
        if record.brand not in self.credentials:
            return self._dead_letter(
                record, Reason.UNKNOWN_BRAND, f"no credentials for brand {record.brand!r}"
            )
        lock = ReceiptLock(
            self.redis,
            record.brand,
            record.receipt_id,
            record.rid,
            record.dispatch,
            self.lock_seconds,
        )
        taken, marked = lock.take()  # a receipt fiscalised already is not locked: absorbed
        if marked is not None:
            return self._absorb(record, marked)
        if not taken:
            record.deferrals += 1
            due = self.clock() + BUSY_RECEIPT_WAIT_SECONDS
            return self._park(
                record,
                due,
                "receipt busy in another worker",
                RetryClass.RECEIPT_BUSY,
                counted=False,
            )
        run = _Run(record, lock, leased_until=leased_until)  # as `begin` leased it
        try:
            return self._apply(run)
        except Deferred as deferred:
            return self._deferred(record, deferred, under_way=run.calls > 0)
        except CloposError as exc:
            if run.calls == 0:
                record.attempts += 1  # failed before its first request (auth): still a try
            if exc.call == "PATCH" and exc.http_status is None:
                # Timed out or cut off: the PATCH may still land. Until it surely has (or
                # failed), nobody calls for this receipt: not another result, which could
                # read before it lands and write another fiscal id after it, and not this
                # result's re-run, which would send a second PATCH while the first is live.
                run.keep_lock = lock.hold_in_flight(IN_FLIGHT_SECONDS)
            self._after_call(run, exc.rate, exc)
            return self._failed(record, exc)
        except (redis.RedisError, Superseded):
            raise  # infrastructure: the task shell leaves the result to its lease
        except Exception as exc:
            # A bug, not the API: keep the result and retry it like a transient failure, so
            # it is never lost and never spins; the window ends it as retries_exhausted.
            log.exception(kv("result_internal_error", rid=record.rid, brand=record.brand))
            return self._failed(record, TransientError(f"internal error: {exc!r}"[:300]))
        finally:
            self._record_answered(run)
            with contextlib.suppress(redis.RedisError):  # else it lapses (probe timeout)
                self._drop_probe(run)  # a probe taken for a call that never went
            if not run.keep_lock and not run.released:
                lock.release()

    def _apply(self, run: _Run) -> Outcome:
        """GET, decide, PATCH; from the GET again whenever the receipt lock lapsed."""
        for _ in range(LOCK_REGAINS + 1):
            try:
                return self._get_and_patch(run)
            except LockLost:
                if not run.lock.acquire():
                    due = self.clock() + BUSY_RECEIPT_WAIT_SECONDS
                    record = run.record
                    return self._park(
                        record,
                        due,
                        "receipt lock lost to another",
                        RetryClass.RECEIPT_BUSY,
                        counted=False,
                    )
                log.warning(
                    kv(
                        "receipt_lock_regained",
                        rid=run.record.rid,
                        receipt_id=run.record.receipt_id,
                    )
                )
        raise TransientError("the receipt lock kept lapsing before our requests")

    def _get_and_patch(self, run: _Run) -> Outcome:
        record = run.record
        gate = _RunGate(self, run)
        got = self.client.get_receipt(record.brand, record.receipt_id, record.venue_id, gate=gate)
        # The GET's record rides with the PATCH's gate, unless its answer says the window is
        # more than half used: what that teaches the budget (others' use) goes at once.
        self._after_call(
            run, got.rate, None, self._ok(record, "GET", got.status), defer=self._roomy(got.rate)
        )
        receipt = got.data.get("data")
        if not isinstance(receipt, dict):
            raise TransientError("GET answered without a receipt object", http_status=got.status)
        decision = decide(receipt, record.fiscal_id)
        if decision.action is Action.CONFLICT:
            return self._dead_letter(record, Reason.FISCAL_ID_CONFLICT, decision.detail, got.status)
        if decision.action is Action.NOT_CLOSED:
            return self._not_ready(record, NotReadyError(decision.detail, http_status=got.status))
        if decision.action is Action.DONE:
            return self._finish(record, Kind.ALREADY_DONE, decision.detail, run=run)
        patched = self.client.patch_receipt(
            record.brand, record.receipt_id, decision.fields, record.venue_id, gate=gate
        )
        self._after_call(run, patched.rate, None, self._ok(record, "PATCH", patched.status))
        after = patched.data.get("data")
        if isinstance(after, dict) and not confirms(after, record.fiscal_id):
            # Somebody else wrote the receipt between our GET and PATCH; look again.
            raise TransientError(
                "PATCH response does not show our fiscal_id locked", http_status=200
            )
        return self._finish(record, Kind.FISCALISED, decision.detail, patched=True, run=run)

    # --- before and after every HTTP request ------------------------------------------------
    def _gate(self, run: _Run) -> None:
        """Before the token: may this run's next call go, and when? Sleeps a short wait for
        its slot; raises Deferred otherwise. Without a token in the process (it may take a
        /v2/auth call) the brand's circuit and pause are asked first: a brand that may not
        call costs no auth call. Everything else is checked right before the send."""
        record, brand = run.record, run.record.brand
        if run.calls == 0 and (record.failures or record.not_ready_since):
            blocked = self.guard.blocked_until()
            if blocked is not None:
                raise Deferred(
                    blocked + random.uniform(0, GUARD_SPREAD_SECONDS), "failed-call guard"
                )
        if not self.tokens.has(brand):
            self._record_answered(run)  # a probe's success first: it closes the circuit
            self._may_authenticate(run)
        self._await_slot(run)  # a Deferred leaves a probe taken to the run's end

    def _may_authenticate(self, run: _Run) -> None:
        brand = run.record.brand
        if not run.probe:  # a run holding the probe (its re-try after a 401) goes on with it
            permit = self.breaker.allow(brand)
            if not permit.allowed:
                until = permit.wait_until or self.clock() + 1
                raise Deferred(until, f"circuit open for {brand}", circuit_open=True)
            run.probe = permit.probe
        paused = self.budget.paused_until(brand)
        if paused is not None:
            raise Deferred(paused, f"brand {brand} paused after a 429")

    def _await_slot(self, run: _Run) -> None:
        record, brand = run.record, run.record.brand
        rate = self.budget.policy
        if record.slot is not None and run.calls < record.slots:
            slot = record.slot + run.calls * record.step  # reserved at admission
        else:
            # Under way (its PATCH after a not-ready GET, a re-try after a 401, a re-read
            # after a lost lock): ahead of the brand's queue, never behind its backlog.
            slot = self.budget.reserve(brand, first=True).start
        wait = slot - self.clock()
        if wait > rate.short_wait + rate.lead:
            raise Deferred(slot - rate.lead, f"budget slot of {brand} is later")
        self._wait(run, wait)

    def _fence(self, run: _Run) -> None:
        """Right before the send, in one step (worker/gate.py): still our result and our
        receipt lock (both extended), the circuit lets it call, no 429 pause, and the
        window guard counts it (a short wait for the window is slept and it asks again)."""
        record, brand = run.record, run.record.brand
        while True:
            now = self.clock()
            verdict, change = self.gate.check(
                record.rid,
                record.dispatch,
                run.lock,
                brand,
                probe=run.probe,
                now=now,
                answered=run.answered,
            )
            if run.answered is not None:
                run.answered = None
                self._circuit_changed(brand, change, None)
            run.probe = verdict.probe
            if verdict.verdict == "ok":
                run.leased_until = now + self.store.run_lease
                break
            at = verdict.at if verdict.at is not None else now + 1
            if verdict.verdict == "full" and at - now <= self.budget.policy.short_wait:
                self._wait(run, at - now)
                continue
            self._drop_probe(run)  # not this call (a lock regained re-reads, unprobed)
            if verdict.verdict == "superseded":
                raise Superseded
            if verdict.verdict == "lock_lost":
                raise LockLost
            if verdict.verdict == "open":
                raise Deferred(at, f"circuit open for {brand}", circuit_open=True)
            if verdict.verdict == "paused":
                raise Deferred(at, f"brand {brand} paused after a 429")
            raise Deferred(at, f"window of {brand} is full (others use the budget too)")
        if run.calls == 0:
            record.attempts += 1
        run.calls += 1
        run.sent = now

    def _drop_probe(self, run: _Run) -> None:
        if run.probe:
            self.breaker.release_probe(run.record.brand)  # it did not call after all
            run.probe = False

    def _wait(self, run: _Run, seconds: float) -> None:
        """Sleep a short wait, the result's lease covering it so it is not re-driven: it is
        extended first unless it outlasts the wait already (set by `begin` and by every
        send's gate). No wait, no renewal: the gate right before the send extends it."""
        if seconds <= 0:
            return
        record, now = run.record, self.clock()
        if now + seconds + LEASE_SPARE_SECONDS > run.leased_until:
            if not self.store.renew(record, now + seconds):
                raise Superseded
            run.leased_until = now + seconds + self.store.run_lease
        self.sleep(seconds)
        telemetry.buffer(self.redis, telemetry.wait_ms(Wait.SLEPT), telemetry.millis(seconds))

    def _after_call(
        self,
        run: _Run,
        rate: RateLimitInfo,
        exc: CloposError | None,
        attempt: Attempt | None = None,
        *,
        defer: bool = False,
    ) -> None:
        """What one call tells the brand's budget (the server's view of the window) and its
        circuit, in one round trip with the call's audit attempt: 5xx, timeouts and an
        auth-class answer to a receipt call fail it; an answer about the receipt (even 404
        or 400) shows the API works; a 429 and a rejected /v2/auth are neither."""
        if isinstance(exc, RateLimitedError):
            return  # its Remaining (0) describes the pause, not others' use: see _failed
        # A rejected /v2/auth (or its remembered rejection) is not a failed receipt call: the
        # auth budget and the remembered rejection bound those, and the results must reach
        # auth_failed after their own bounded retries, not wait behind a cool-down.
        # It says nothing about the receipt calls either: the circuit is left as it is (a
        # probe that never reached a receipt call is let go for another).
        rejected_auth = isinstance(exc, AuthError) and exc.call in (None, "auth")
        if rejected_auth:
            self._drop_probe(run)
            if not run.calls:
                return
        answered = Answered(
            run.record.brand,
            rate if run.calls and not rejected_auth else None,  # /v2/auth's headers: not ours
            run.sent,
            ok=None if rejected_auth else not isinstance(exc, TransientError | AuthError),
            probe=run.probe,
            now=self.clock(),
            attempt=attempt,
        )
        run.probe = False
        if defer:  # a GET that answered: it rides with the PATCH's gate (or the run's end)
            run.answered = answered
            return
        self._record_answered(run)  # the breaker sees the run's calls in their order
        self._circuit_changed(run.record.brand, self.gate.record(answered), exc)

    def _record_answered(self, run: _Run) -> None:
        """The run ends with its last call not recorded yet (no PATCH followed its GET)."""
        if run.answered is None:
            return
        answered, run.answered = run.answered, None
        try:
            self._circuit_changed(answered.brand, self.gate.record(answered), None)
        except redis.RedisError as exc:  # the budget and the circuit miss one success
            log.warning(kv("call_unrecorded", brand=answered.brand, error=exc.__class__.__name__))

    def _circuit_changed(
        self, brand: str, change: Transition | None, exc: CloposError | None
    ) -> None:
        if change is None or not change.change:
            return
        log.warning(
            kv(
                "circuit_" + change.change,
                brand=brand,
                cooldown=change.cooldown or None,
                error=str(exc) if exc else None,
            )
        )
        self.telemetry.count(telemetry.circuit(change.change))

    def _absorb(self, record: ResultRecord, marked: str) -> Outcome:
        """The receipt's fiscalised marker says `marked`: this result is done, or conflicts."""
        if marked == record.fiscal_id:
            return self._finish(record, Kind.DUPLICATE, "already fiscalised by this worker")
        return self._dead_letter(
            record, Reason.FISCAL_ID_CONFLICT, f"receipt was fiscalised with fiscal_id {marked!r}"
        )

    # --- failures: one handler per error class --------------------------------------------
    def _failed(self, record: ResultRecord, exc: CloposError) -> Outcome:
        self._attempt(record, exc.call or "call", exc.http_status, exc.kind)
        if isinstance(exc, RateLimitedError):
            self.budget.pause(record.brand, exc.retry_after)  # every process, not just this one
            log.warning(kv("brand_paused", brand=record.brand, seconds=exc.retry_after))
            # A result under way (its PATCH was refused) keeps its place ahead of the queue.
            record.first = record.first or exc.call == "PATCH"
            due = self.clock() + self.policy.rate_limit_wait(exc.retry_after)
            return self._park(
                record,
                due,
                str(exc),
                RetryClass.RATE_LIMITED,
                exc.http_status,
                counted=False,
                waited=(Wait.PAUSED, exc.retry_after),
            )
        record.first = False  # a failure: its next try queues behind the brand's backlog
        if isinstance(exc, PermanentError):
            return self._dead_letter(record, Reason.VALIDATION_FAILED, str(exc), exc.http_status)
        if isinstance(exc, NotReadyError):
            return self._not_ready(record, exc)
        if isinstance(exc, AuthError):
            record.auth_failures += 1
            retry = self.policy.auth(record.auth_failures, self.clock())
            if retry.due is None:
                return self._dead_letter(record, Reason.AUTH_FAILED, str(exc), exc.http_status)
            # Not before the brand's remembered rejection lapses: each try then meets a real
            # /v2/auth answer (made by one process for all), so fixed credentials are seen.
            due = max(retry.due, self.clock() + FAILURE_MEMORY_SECONDS + random.uniform(0, 2))
            return self._park(record, due, str(exc), RetryClass.AUTH, exc.http_status)
        now = self.clock()
        record.failures += 1
        record.transient_since = record.transient_since or now
        retry = self.policy.transient(record.failures, record.transient_since, now)
        if retry.due is None:
            return self._dead_letter(record, Reason.RETRIES_EXHAUSTED, str(exc), exc.http_status)
        return self._park(record, retry.due, str(exc), RetryClass.TRANSIENT, exc.http_status)

    def _deferred(self, record: ResultRecord, deferred: Deferred, *, under_way: bool) -> Outcome:
        """No call was allowed: wait, uncounted. A result under way (it made a call in this
        run: its PATCH was held) keeps its place ahead of the queue; one that made none
        queues again. An open circuit is the brand's transient failure: its window runs on."""
        now = self.clock()
        record.deferrals += 1
        record.first = record.first or under_way
        if deferred.circuit_open:
            record.transient_since = record.transient_since or now
            if now >= record.transient_since + self.policy.transient_window:
                error = f"{deferred.why}; last error: {record.last_error or '-'}"
                status = record.last_status
                return self._dead_letter(record, Reason.RETRIES_EXHAUSTED, error, status)
            # Spread the brand's waiting results over the cool-down, not all at its end.
            spread = max(1.0, deferred.until - now)
            due = deferred.until + random.uniform(0, spread)
            return self._park(record, due, deferred.why, RetryClass.CIRCUIT_OPEN, counted=False)
        due = max(deferred.until, now)
        return self._park(
            record,
            due,
            deferred.why,
            RetryClass.BUDGET,
            counted=False,
            waited=(Wait.DEFERRED, due - now),
        )

    def _not_ready(self, record: ResultRecord, exc: NotReadyError) -> Outcome:
        now = self.clock()
        record.failures += 1
        record.first = False  # a retry's GET queues behind the brand's backlog
        record.not_ready_since = record.not_ready_since or now
        record.not_found = exc.http_status == 404 or exc.error_code == "not_found"
        retry = self.policy.not_ready(record.failures, record.not_ready_since, now)
        if retry.due is not None:
            return self._park(record, retry.due, exc.message, RetryClass.NOT_READY, exc.http_status)
        reason = Reason.RECEIPT_NOT_FOUND if record.not_found else Reason.RECEIPT_NOT_CLOSED
        return self._dead_letter(record, reason, exc.message, exc.http_status)

    # --- outcomes: each is one transaction, fenced on the run's dispatch -------------------
    def _park(
        self,
        record: ResultRecord,
        due: float,
        error: str,
        why: RetryClass,
        http_status: int | None = None,
        *,
        counted: bool = True,
        waited: tuple[Wait, float] | None = None,
    ) -> Outcome:
        """Back to the schedule until `due`; `counted`: a failed attempt (its error is kept
        as the result's last); `waited`: rate-limit seconds this parking stands for."""
        if counted:
            record.last_error, record.last_status = error, http_status
        due = min(due, record.deadline)  # no wait outlives the result's deadline
        with self.store.fenced(record) as pipe:
            self.store.park(record, due, pipeline=pipe)
            pipe.hincrby(keys.COUNTERS, telemetry.RETRIES_SCHEDULED, 1)
            pipe.hincrby(keys.COUNTERS, telemetry.retry(why), 1)
            if waited is not None and waited[1] > 0:
                pipe.hincrby(
                    keys.COUNTERS, telemetry.wait_ms(waited[0]), telemetry.millis(waited[1])
                )
        log.info(
            kv(
                "result_parked",
                rid=record.rid,
                brand=record.brand,
                receipt_id=record.receipt_id,
                wait=round(due - self.clock(), 2),
                error=error,
            )
        )
        return Outcome(Kind.PARKED, error, due=due)

    def _finish(
        self,
        record: ResultRecord,
        kind: Kind,
        detail: str,
        patched: bool = False,
        run: _Run | None = None,
    ) -> Outcome:
        """Done: the receipt's record fiscalised (its marker), the result's record gone,
        counted; the run's receipt lock released in the same transaction (the marker is set
        before anyone else may take the lock)."""
        with self.store.fenced(record) as pipe:
            pipe.set(
                keys.last_success(record.brand), repr(self.clock()), ex=keys.BRAND_REGISTRY_SECONDS
            )
            self.audit.set_state(
                record.brand,
                record.receipt_id,
                "fiscalised",
                fiscal_id=record.fiscal_id,
                pipeline=pipe,
            )
            self.store.forget(record.rid, pipeline=pipe)
            pipe.hincrby(keys.COUNTERS, kind.value, 1)
            if patched:
                pipe.hincrby(keys.COUNTERS, telemetry.PATCHES, 1)
                self._observe_latency(record, pipe)
            if run is not None and not run.keep_lock:
                run.lock.release(pipeline=pipe)
        if run is not None:
            run.released = True
        log.info(
            kv(
                f"result_{kind.value}",
                rid=record.rid,
                brand=record.brand,
                receipt_id=record.receipt_id,
                fiscal_id=record.fiscal_id,
                attempts=record.attempts,
            )
        )
        self._tell(record, kind)
        return Outcome(kind, detail)

    def _dead_letter(
        self, record: ResultRecord, reason: Reason, error: str, http_status: int | None = None
    ) -> Outcome:
        now = self.clock()
        with self.store.fenced(record) as pipe:
            dlq_id = self.dlq.add(
                reason=reason,
                payload=record.payload,
                error=error,
                receipt_id=record.receipt_id,
                brand=record.brand,
                fiscal_id=record.fiscal_id,
                attempts=record.attempts,
                first_seen=to_rfc3339(record.first_seen),
                last_seen=to_rfc3339(now),
                http_status=http_status if http_status is not None else record.last_status,
                result=record.result,
                rid=record.rid,
                pipeline=pipe,
            )
            self.audit.set_state(
                record.brand,
                record.receipt_id,
                "dead_lettered",
                fiscal_id=record.fiscal_id,
                dlq_id=dlq_id,
                pipeline=pipe,
            )
            self.store.forget(record.rid, pipeline=pipe)
            pipe.hincrby(keys.COUNTERS, telemetry.dead_lettered(reason), 1)
        log.warning(
            kv(
                "result_dead_lettered",
                rid=record.rid,
                brand=record.brand,
                receipt_id=record.receipt_id,
                reason=reason,
                dlq_id=dlq_id,
                error=error,
            )
        )
        self._tell(record, Kind.DEAD_LETTERED, reason=reason, dlq_id=dlq_id, error=error)
        return Outcome(Kind.DEAD_LETTERED, error, reason=reason, dlq_id=dlq_id)

    def _tell(self, record: ResultRecord, kind: Kind, **dead_letter: Any) -> None:
        """The finished result's audit event, after its outcome committed."""
        self.events.finished(
            kind.value,
            rid=record.rid,
            result=record.result,
            attempts=record.attempts,
            first_seen=record.first_seen,
            **dead_letter,
        )

    def _dead_letter_damaged(self, damaged: Damaged) -> Outcome:
        """A record that cannot be read: dead-letter what it holds (its payload is the
        adapter's entry) rather than fail its task at every re-drive."""
        error = f"the worker's record of this result is damaged ({damaged.error})"
        with self.store.fenced_raw(damaged.rid, damaged.dispatch) as pipe:
            dlq_id = self.dlq.add(
                reason=Reason.RETRIES_EXHAUSTED,
                payload=damaged.raw.get("payload", ""),
                error=error,
                rid=damaged.rid,
                pipeline=pipe,
            )
            self.store.forget(damaged.rid, pipeline=pipe)
            pipe.hincrby(keys.COUNTERS, telemetry.dead_lettered(Reason.RETRIES_EXHAUSTED), 1)
        log.error(kv("result_damaged", rid=damaged.rid, dlq_id=dlq_id, error=damaged.error))
        self.events.finished(
            Kind.DEAD_LETTERED.value,
            rid=damaged.rid,
            reason=Reason.RETRIES_EXHAUSTED,
            dlq_id=dlq_id,
            error=error,
        )
        return Outcome(Kind.DEAD_LETTERED, error, reason=Reason.RETRIES_EXHAUSTED, dlq_id=dlq_id)

    def _observe_latency(self, record: ResultRecord, pipe: redis.client.Pipeline) -> None:
        """End to end, at the PATCH: from the stream entry (its id is its time in ms) and,
        when the adapter sent it, from printed_at."""
        now = self.clock()
        added = telemetry.entry_time(record.rid)
        if added is not None:
            telemetry.observe_latency(pipe, Since.STREAM, now - added)
        printed = record.result.get("printed_at")
        if isinstance(printed, str):
            with contextlib.suppress(ValueError):
                printed_at = parse_rfc3339(printed).timestamp()
                telemetry.observe_latency(pipe, Since.PRINTED, now - printed_at)

    def _roomy(self, rate: RateLimitInfo) -> bool:
        """Whether an answer's RateLimit-Remaining leaves more than half the window."""
        return rate.remaining is None or rate.remaining > self.budget.policy.limit_for(rate) / 2

    @staticmethod
    def _ok(record: ResultRecord, call: str, status: int) -> Attempt:
        return Attempt(record.brand, record.receipt_id, call, status, "ok")

    def _attempt(self, record: ResultRecord, call: str, status: int | None, outcome: str) -> None:
        self.audit.record_attempt(
            record.brand, record.receipt_id, call=call, http_status=status, outcome=outcome
        )
