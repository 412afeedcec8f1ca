"""One round trip before a receipt request and one after it (the run's hot path).

Before the send (`RequestGate.check`, worker/scripts/gate_check.lua), atomically: the run's
fence (still the result's dispatch, still the receipt lock's holder), the brand's circuit
breaker (or the half-open probe), its 429 pause and the window guard; only if all pass are
the call counted and the lock and lease extended. After the answer (`RequestGate.record`,
gate_record.lua): others' use of the budget learnt from RateLimit-Remaining and the call's
outcome for the breaker, sent in one pipeline with the call's audit attempt and the
process's buffered counters (worker/telemetry.py).

The parts keep their own modules and semantics (worker/breaker.py, worker/ratelimit.py,
worker/store.py): these scripts include the same Lua fragments their scripts do.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from worker import keys, scripts, telemetry
from worker.audit import AuditTrail
from worker.breaker import CircuitBreaker, Transition
from worker.errors import RateLimitInfo
from worker.idempotency import ReceiptLock
from worker.ratelimit import RatePolicy


@dataclass(frozen=True)
class Verdict:
    """What gate_check said: `verdict` ok | superseded | lock_lost | open | paused | full;
    `probe`: this run holds the brand's half-open probe; `at`: when (see the script)."""

    verdict: str
    probe: bool
    at: float | None


@dataclass(frozen=True)
class Attempt:
    """One API call's outcome for the audit trail."""

    brand: str
    receipt_id: int
    call: str
    http_status: int | None
    outcome: str


@dataclass(frozen=True)
class Answered:
    """What one answered (or unanswered) call tells the brand's budget and breaker, and the
    audit trail: `rate` None when its headers teach nothing, `ok` None when the answer says
    nothing about the circuit."""

    brand: str
    rate: RateLimitInfo | None
    sent: float
    ok: bool | None
    probe: bool
    now: float
    attempt: Attempt | None = None


class RequestGate:
    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        breaker: CircuitBreaker,
        rate: RatePolicy,
        audit: AuditTrail,
        run_lease: float,
    ) -> None:
        self.redis = redis_client
        self.breaker = breaker
        self.rate = rate
        self.audit = audit
        self.run_lease = run_lease
        self._check = redis_client.register_script(scripts.load("gate_check"))
        self._record = redis_client.register_script(scripts.load("gate_record"))

    def check(
        self,
        rid: str,
        dispatch: int,
        lock: ReceiptLock,
        brand: str,
        *,
        probe: bool,
        now: float,
        answered: Answered | None = None,
    ) -> tuple[Verdict, Transition | None]:
        """gate_check for the next call; with `answered` (the run's previous call, not yet
        recorded) `record` goes first in the same round trip. The verdict, and the
        recorded call's transition."""
        check_keys = [
            keys.result(rid),
            keys.SCHEDULE,
            lock.key,
            keys.breaker(brand),
            keys.breaker_probe(brand),
            keys.rate_pause(brand),
            keys.rate_calls(brand),
            keys.rate_others(brand),
        ]
        check_args = [
            repr(now),
            rid,
            dispatch,
            lock.token,
            lock.ttl_ms,
            repr(now + self.run_lease),
            "1" if probe else "0",
            int(self.breaker.probe_timeout * 1000),
            secrets.token_hex(6),
            repr(self.rate.window),
            self.rate.limit,
            f"{now:.6f}:{secrets.token_hex(4)}",
        ]
        pipe = self.redis.pipeline(transaction=False)
        record = self._queue_record(pipe, answered) if answered is not None else None
        pipe.evalsha(self._check.sha, len(check_keys), *check_keys, *check_args)
        replies = pipe.execute(raise_on_error=False)
        change = None
        checked = replies[-1]
        if record is not None:
            change = self._recorded(replies[:-1], record)
            if isinstance(replies[0], NoScriptError):
                # Redis had lost the record script (a restart), so it ran after the check: a
                # refusal may be one it lifts (a probe's success closes the circuit). A
                # refusal wrote nothing, so the check goes once more, after it.
                checked = _ran(checked, self._check, check_keys, check_args)
                if _text(checked[0]) != "ok":
                    if _text(checked[1]) == "1":
                        check_args[6] = "1"  # the probe it took is this run's now
                    checked = self._check(keys=check_keys, args=check_args)
        verdict, held, at = _ran(checked, self._check, check_keys, check_args)
        text = _text(at)
        return Verdict(_text(verdict), _text(held) == "1", float(text) if text else None), change

    def record(self, answered: Answered) -> Transition:
        """After a call: others' use of the budget, the breaker, the audit attempt and the
        buffered counters, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        record = self._queue_record(pipe, answered)
        return self._recorded(pipe.execute(raise_on_error=False), record)

    def _queue_record(
        self, pipe: redis.client.Pipeline, answered: Answered
    ) -> tuple[list[str], list[object]]:
        rate = answered.rate
        remaining = "" if rate is None or rate.remaining is None else str(rate.remaining)
        brand, ok = answered.brand, answered.ok
        script_keys = [
            keys.rate_calls(brand),
            keys.rate_others(brand),
            keys.breaker(brand),
            keys.breaker_probe(brand),
        ]
        args: list[object] = [
            repr(answered.sent),
            repr(self.rate.window),
            self.rate.limit_for(rate),
            remaining,
            "" if ok is None else ("1" if ok else "0"),
            repr(answered.now),
            self.breaker.threshold,
            repr(self.breaker.cooldown),
            repr(self.breaker.max_cooldown),
            "1" if answered.probe else "0",
        ]
        pipe.evalsha(self._record.sha, len(script_keys), *script_keys, *args)
        attempt = answered.attempt
        if attempt is not None:
            self.audit.record_attempt(
                attempt.brand,
                attempt.receipt_id,
                call=attempt.call,
                http_status=attempt.http_status,
                outcome=attempt.outcome,
                pipeline=pipe,
            )
        telemetry.drain(pipe)
        return script_keys, args

    def _recorded(
        self, replies: list[object], record: tuple[list[str], list[object]]
    ) -> Transition:
        for failed in replies[1:]:
            if isinstance(failed, Exception):
                raise failed
        change, cooldown = _ran(replies[0], self._record, *record)
        return Transition(_text(change), float(_text(cooldown)))


def _ran(reply: object, script: Script, script_keys: list[str], args: list[object]) -> Any:
    """A pipelined EVALSHA's reply; the script once more, alone, if Redis had lost it (a
    restart: NOSCRIPT), the error if it failed."""
    if isinstance(reply, NoScriptError):
        return script(keys=script_keys, args=args)
    if isinstance(reply, Exception):
        raise reply
    return reply


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
