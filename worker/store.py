"""The durable record of every result not finished yet, and the schedule that drives it.

Each accepted result is a hash (keys.result) plus one member of a sorted set
(keys.SCHEDULE) whose score is the unix time the result next needs attention; the hash's
`state` says which kind of score it is:

    due       score <= now                 admission (`admit_due`) publishes it or parks it
    queued    score = now + WORKER_LEASE   admitted, being published: a publisher that dies
                                           before the message is in the queue frees it soon
              score = now + QUEUE_LEASE    published (`published`), waiting in the queue
              score = now + WORKER_LEASE   received by a worker, renewed by that worker's
                                           heartbeat (`hold`)
    running   score = now + RUN_LEASE      a task has it; renewed before every API call
                                           (worker/gate.py) and by the heartbeat
    parked    score = retry due time       waiting out a backoff, a 429, a busy receipt or
                                           its brand's budget slot (minus the lead)

Invariants:
- A result leaves both only when it is finished (fiscalised or dead-lettered), in the same
  transaction that records the outcome. So whatever Celery or the transport loses — a
  SIGKILL between fetch and the unacked record, a task failed by a Redis error, a message
  dropped by a restart, a worker that died holding prefetched messages — its lease lapses
  and the dispatcher publishes it again: delivery does not rest on the broker.
- A live record never expires (no TTL). Instead every result has a `deadline`
  (first_seen + the longer retry window): whatever it waits for — a budget slot, a 429
  pause, an open circuit, a busy receipt — it is published at its deadline and its task
  dead-letters it `retries_exhausted`. No wait is unbounded.
- Each publication bumps `dispatch`. A task carrying an older number does nothing, and every
  write of a run is fenced on its number (`fenced`, `fence`): a run whose lease lapsed can
  neither recreate a record nor reset its windows.
- A schedule entry without a record (an orphan: something deleted or evicted it) is
  returned by admission to be dead-lettered, never dropped silently; a record without a
  schedule entry is put back by `reschedule_lost` (the dispatcher's sweep).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from worker import keys, scripts, telemetry
from worker.idempotency import ReceiptLock
from worker.ratelimit import CALLS_PER_RESULT, RatePolicy, reserve_keys
from worker.retry import TRANSIENT_WINDOW_SECONDS

QUEUE_LEASE_SECONDS = 120.0  # published, not started yet: longer than a short queue takes
RUN_LEASE_SECONDS = 30.0  # started: renewed before every API call and by the heartbeat
HELD_LEASE_SECONDS = 30.0  # received by a live worker: renewed by its heartbeat
# (settings: FISCAL_QUEUE_LEASE_SECONDS, FISCAL_RUN_LEASE_SECONDS, FISCAL_WORKER_LEASE_SECONDS)
DEFAULT_LIFETIME_SECONDS = TRANSIENT_WINDOW_SECONDS
ORPHAN_RECHECK_SECONDS = 60.0  # a schedule entry without its record, until it is dead-lettered


class State(StrEnum):
    """Where an unfinished result is, as its record says (field `state`)."""

    DUE = "due"  # recorded, waiting for admission
    QUEUED = "queued"  # published to Celery, or received by a worker
    RUNNING = "running"  # a task has begun it
    PARKED = "parked"  # waiting out a backoff, a pause, a busy receipt or its budget slot


class Begin(StrEnum):
    """Why `ResultStore.begin` gave no record."""

    GONE = "gone"  # finished already
    STALE = "stale"  # a newer dispatch owns the result


@dataclass(frozen=True)
class Damaged:
    """A record `begin` could not parse (its result or first_seen is unreadable): it is
    dead-lettered with what it holds, never retried forever."""

    rid: str
    dispatch: int
    raw: dict[str, str]
    error: str


class Superseded(Exception):
    """This run's dispatch is no longer the result's: it must not write anything."""


# The scripts, worker/scripts/store_*.lua (each one's header gives its KEYS and ARGV):
#   store_create       record a new result, only if it is new
#   store_admit        admission: publish, park, or report as orphans the candidates read
#   store_begin        a task starts: only the current dispatch may run
#   store_renew        renew a running lease
#   store_hold         a worker's heartbeat keeps the results it holds leased
#   store_published    their messages are in the queue: the queue lease
#   store_fence        the dispatch and the receipt lock still ours (`fence`; the hot path
#                      runs the same check inside worker/scripts/gate_check.lua)
#   store_reschedule   records that lost their schedule entry are put back


@dataclass
class ResultRecord:
    """One unfinished result as stored; `result` is the validated ingest entry."""

    rid: str
    result: dict[str, Any]
    payload: str
    first_seen: float
    deadline: float  # when it is dead-lettered retries_exhausted, whatever it waits for
    dispatch: int = 0
    attempts: int = 0  # task runs that reached the API
    failures: int = 0  # consecutive failed attempts, for the backoff
    not_ready_since: float | None = None
    not_found: bool = False  # the last not-ready answer was a 404 (else: not closed yet)
    transient_since: float | None = None
    auth_failures: int = 0
    deferrals: int = 0  # runs that could not call (budget, pause, circuit, busy receipt)
    first: bool = False  # under way: its next admission reserves ahead of the queue
    last_error: str | None = None
    last_status: int | None = None
    slot: float | None = None  # first reserved call slot (unix s), from admission
    step: float = 0.0  # seconds between its reserved slots
    slots: int = 0  # how many slots it reserved

    @property
    def brand(self) -> str:
        return str(self.result["brand"])

    @property
    def receipt_id(self) -> int:
        return int(self.result["receipt_id"])

    @property
    def fiscal_id(self) -> str:
        return str(self.result["fiscal_id"])

    @property
    def venue_id(self) -> int | None:
        value = self.result.get("venue_id")
        return int(value) if value is not None else None

    @classmethod
    def from_hash(
        cls, rid: str, raw: Mapping[str, str], default_lifetime: float = 0.0
    ) -> ResultRecord:
        """Parse a stored record; a damaged counter reads as unset rather than failing the
        result for good (the fields that make the result, `result` and `first_seen`, must
        parse). A record without a deadline (an older version's) gets first_seen plus
        `default_lifetime`."""

        def number(name: str, kind: type[int] | type[float]) -> Any:
            try:
                return kind(raw[name]) if raw.get(name) not in (None, "") else None
            except ValueError:
                return None

        first_seen = float(raw["first_seen"])
        deadline = number("deadline", float)
        return cls(
            rid=rid,
            result=json.loads(raw["result"]),
            payload=raw.get("payload", ""),
            first_seen=first_seen,
            deadline=deadline if deadline is not None else first_seen + default_lifetime,
            dispatch=number("dispatch", int) or 0,
            attempts=number("attempts", int) or 0,
            failures=number("failures", int) or 0,
            not_ready_since=number("not_ready_since", float),
            not_found=raw.get("not_found") == "1",
            transient_since=number("transient_since", float),
            auth_failures=number("auth_failures", int) or 0,
            deferrals=number("deferrals", int) or 0,
            first=raw.get("first") == "1",
            last_error=raw.get("last_error") or None,
            last_status=number("last_status", int),
            slot=number("slot", float),
            step=number("step", float) or 0.0,
            slots=number("slots", int) or 0,
        )


@dataclass(frozen=True)
class Claimed:
    rid: str
    dispatch: int
    brand: str
    receipt_id: str
    lease_until: float = 0.0  # the publish lease admission gave it


@dataclass(frozen=True)
class Admission:
    """What one admission pass did: results to publish now, how many it parked, and the
    schedule entries it found without a record (orphans, for the dispatcher)."""

    publish: list[Claimed]
    parked: int
    orphans: list[str] = field(default_factory=list)
    # candidates read that another dispatcher (or the end of the result) took before
    # the admission script ran: more may be due
    skipped: int = 0

    @property
    def handled(self) -> int:
        return len(self.publish) + self.parked


def _flatten(record_fields: Mapping[str, Any]) -> dict[str, str]:
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)

    return {k: text(v) for k, v in record_fields.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ResultStore:
    """The records and the schedule. `lifetime`: seconds from first_seen to a result's
    deadline (the longer retry window; worker/runtime.py)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        rate: RatePolicy,
        lifetime: float = DEFAULT_LIFETIME_SECONDS,
        queue_lease: float = QUEUE_LEASE_SECONDS,
        run_lease: float = RUN_LEASE_SECONDS,
        publish_lease: float = HELD_LEASE_SECONDS,
    ) -> None:
        self.redis = redis_client
        self.lifetime = lifetime
        self.rate = rate
        self.queue_lease = queue_lease
        self.run_lease = run_lease
        self.publish_lease = publish_lease
        self._create = redis_client.register_script(scripts.load("store_create"))
        self._admit = redis_client.register_script(scripts.load("store_admit"))
        self._begin = redis_client.register_script(scripts.load("store_begin"))
        self._renew = redis_client.register_script(scripts.load("store_renew"))
        self._hold = redis_client.register_script(scripts.load("store_hold"))
        self._fence = redis_client.register_script(scripts.load("store_fence"))
        self._published = redis_client.register_script(scripts.load("store_published"))
        self._reschedule = redis_client.register_script(scripts.load("store_reschedule"))

    def create(
        self,
        rid: str,
        result: Mapping[str, Any],
        payload: str,
        *,
        score: float,
        now: float,
        pipeline: redis.client.Pipeline | None = None,
    ) -> bool:
        """Record a new result scheduled at `score`; False if it already exists. Queued on
        `pipeline` when given (its reply says the same), True returned."""
        fields = {
            "result": json.dumps(dict(result), separators=(",", ":")),
            "payload": payload,
            "brand": result["brand"],
            "receipt_id": result["receipt_id"],
            "first_seen": repr(now),
            "deadline": repr(now + self.lifetime),
            "dispatch": 0,
            "state": State.DUE.value,
        }
        script_keys = [keys.result(rid), keys.SCHEDULE]
        args = [rid, json.dumps(_flatten(fields)), repr(score)]
        if pipeline is not None:
            scripts.queue(pipeline, self._create, keys=script_keys, args=args)
            return True
        return bool(self._create(keys=script_keys, args=args))

    def admit_due(self, now: float, limit: int) -> Admission:
        """Admit up to `limit` due results (the dispatcher's pass)."""
        found = self.redis.zrangebyscore(keys.SCHEDULE, "-inf", repr(now), start=0, num=limit)
        return self._run_admit("due", now, [_text(rid) for rid in found])

    def admit(self, rids: list[str], now: float) -> Admission:
        """Admit these just-created results (the ingest consumer's fast path)."""
        return self._run_admit("ids", now, rids)

    def _run_admit(self, mode: str, now: float, rids: list[str]) -> Admission:
        """Admission in two steps: the caller read the candidates (mode 'due': the
        schedule's entries due by `now`; 'ids': results just created); here their brands
        and receipts are read, then store_admit re-checks each one and admits it atomically,
        with the keys of its brand and receipt passed in KEYS."""
        if not rids:
            return Admission([], 0)
        with self.redis.pipeline(transaction=False) as pipe:
            for rid in rids:
                pipe.hmget(keys.result(rid), "brand", "receipt_id")
            metas = pipe.execute()
        script_keys = [keys.SCHEDULE]
        candidates: list[str] = []
        for rid, (brand, receipt_id) in zip(rids, metas, strict=True):
            brand = "" if brand is None else _text(brand)
            receipt = "" if receipt_id is None else _text(receipt_id)
            script_keys.append(keys.result(rid))
            if brand:
                script_keys += [
                    keys.receipt(brand, receipt),
                    keys.legacy_fiscalised(brand, receipt),
                    *reserve_keys(brand),
                    keys.breaker(brand),
                ]
            candidates += [rid, brand, receipt]
        lease_until = now + self.publish_lease
        parked, orphans, flat, skipped = self._admit(
            keys=script_keys,
            args=[
                mode,
                repr(now),
                repr(lease_until),
                *self.rate.lua_args(),
                repr(self.rate.lead),
                CALLS_PER_RESULT,
                repr(ORPHAN_RECHECK_SECONDS),
                keys.BREAKER_STATE,
                keys.BREAKER_UNTIL,
                keys.BREAKER_OPEN,
                *candidates,
            ],
        )
        publish = [
            Claimed(
                _text(flat[i]),
                int(flat[i + 1]),
                _text(flat[i + 2]),
                _text(flat[i + 3]),
                lease_until,
            )
            for i in range(0, len(flat), 4)
        ]
        return Admission(publish, int(parked), [_text(rid) for rid in orphans], int(skipped))

    def begin(self, rid: str, dispatch: int, now: float) -> ResultRecord | Begin | Damaged:
        """The record if this dispatch may run, else why not (or that it is unreadable)."""
        reply = self._begin(
            keys=[keys.result(rid), keys.SCHEDULE],
            args=[rid, dispatch, repr(now + self.run_lease)],
        )
        if _text(reply[0]) != "ok":
            return Begin(_text(reply[0]))
        flat = reply[1]
        raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        try:
            record = ResultRecord.from_hash(rid, raw, self.lifetime)
            (record.brand, record.receipt_id, record.fiscal_id)  # noqa: B018 - they must parse
        except (KeyError, ValueError, TypeError) as exc:
            return Damaged(rid, dispatch, raw, f"{exc.__class__.__name__}: {exc}"[:300])
        return record

    def renew(self, record: ResultRecord, now: float) -> bool:
        """Extend the running lease; False if a newer dispatch took the result over."""
        renewed = self._renew(
            keys=[keys.result(record.rid), keys.SCHEDULE],
            args=[record.rid, record.dispatch, repr(now + self.run_lease)],
        )
        return bool(renewed)

    def hold(self, held: list[tuple[str, int]], lease_until: float) -> int:
        """A worker's heartbeat: keep the results it holds leased until `lease_until`."""
        if not held:
            return 0
        return int(
            self._hold(
                keys=[keys.SCHEDULE, *(keys.result(rid) for rid, _ in held)],
                args=[repr(lease_until), *(str(v) for pair in held for v in pair)],
            )
        )

    def published(self, claimed: list[Claimed], now: float) -> int:
        """These admitted results' messages are in the Celery queue: lease them for as long
        as a message may wait there (the queue lease), unless a worker has received them."""
        if not claimed:
            return 0
        return int(
            self._published(
                keys=[keys.SCHEDULE, *(keys.result(c.rid) for c in claimed)],
                args=[
                    repr(claimed[0].lease_until),
                    repr(now + self.queue_lease),
                    *(str(v) for c in claimed for v in (c.rid, c.dispatch)),
                ],
            )
        )

    def fence(self, record: ResultRecord, lock: ReceiptLock, now: float) -> str:
        """Right before a request: 'ok' (lock and lease extended), 'superseded' or
        'lock_lost'."""
        return _text(
            self._fence(
                keys=[lock.key, keys.result(record.rid), keys.SCHEDULE],
                args=[
                    lock.token,
                    lock.ttl_ms,
                    record.rid,
                    record.dispatch,
                    repr(now + self.run_lease),
                ],
            )
        )

    def reschedule_lost(self, rids: list[str], now: float) -> list[str]:
        """Of these records, put back in the schedule those that have no entry there."""
        if not rids:
            return []
        found = self._reschedule(
            keys=[keys.SCHEDULE, *(keys.result(rid) for rid in rids)], args=[repr(now), *rids]
        )
        return [_text(rid) for rid in found]

    def fenced(self, record: ResultRecord) -> AbstractContextManager[redis.client.Pipeline]:
        """A transaction that commits only while `record.dispatch` is still the result's:
        every write of a run (park, finish, dead-letter) goes through one. Queue the writes
        on the yielded pipeline (after MULTI); they run at the end of the `with`. Raises
        Superseded, writing nothing, if a newer dispatch took the result or it is gone."""
        return self.fenced_raw(record.rid, record.dispatch)

    @contextmanager
    def fenced_raw(self, rid: str, dispatch: int) -> Iterator[redis.client.Pipeline]:
        """`fenced` for a result known only by its id and dispatch number."""
        key = keys.result(rid)
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if _text(pipe.hget(key, "dispatch") or "") != str(dispatch):
                    raise Superseded
                pipe.multi()
                yield pipe
                telemetry.drain(pipe)  # the process's buffered counts ride along
                pipe.execute()
            except redis.WatchError:
                raise Superseded from None

    def park(self, record: ResultRecord, due: float, *, pipeline: redis.client.Pipeline) -> None:
        """Queue on the caller's `pipeline`: save the record's counters, schedule it at `due`."""
        pipeline.hset(
            keys.result(record.rid),
            mapping=_flatten(
                {
                    "attempts": record.attempts,
                    "failures": record.failures,
                    "not_ready_since": record.not_ready_since,
                    "not_found": record.not_found,
                    "transient_since": record.transient_since,
                    "auth_failures": record.auth_failures,
                    "deferrals": record.deferrals,
                    "first": record.first,
                    "last_error": record.last_error,
                    "last_status": record.last_status,
                    "state": State.PARKED.value,
                }
            ),
        )
        pipeline.hdel(keys.result(record.rid), "slot", "step", "slots")  # its reservation is spent
        pipeline.zadd(keys.SCHEDULE, {record.rid: due})

    def forget(self, rid: str, *, pipeline: redis.client.Pipeline) -> None:
        """Queue on the caller's `pipeline`: the result is finished; drop its record and its
        schedule entry."""
        pipeline.delete(keys.result(rid))
        pipeline.zrem(keys.SCHEDULE, rid)
