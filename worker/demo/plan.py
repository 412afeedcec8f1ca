"""What the demo does, decided before anything runs: the receipts the fake API holds, the
results the simulated adapter sends and when, and what each of them must end as.

`build_plan` is pure (a seeded `random.Random` gives the same plan); run.py carries it out
and report.py compares the outcome with it.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from worker.dlq import REASONS

# --- the scenario ------------------------------------------------------------------------

SEND_SECONDS = 4.0  # the adapter spreads its results over this long
STREAM = "fiscal:results"  # the default FISCAL_INGEST_STREAM (docs/interface.md)
INTEGRATOR_ID = "demo-integrator"
BRANDS = ("openapitest", "demo-cafe")
UNKNOWN_BRAND = "ghost-bistro"  # has no credentials: unknown_brand
FAKE_RATE_LIMIT = 3000  # per brand per minute: the real 300 would make the demo wait for 429s
LATENCY_SECONDS = {"openapitest": 0.025, "demo-cafe": 0.045}  # the fake API's answer time

# Demo-sized windows so every outcome is reached within seconds (production: minutes/hours).
WORKER_SETTINGS = {
    "NOT_READY_RETRY_WINDOW_SECONDS": "12",
    "NOT_READY_MAX_DELAY_SECONDS": "1",
    "TRANSIENT_RETRY_WINDOW_SECONDS": "20",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_DELAY_SECONDS": "1",
    "RUN_LEASE_SECONDS": "10",
    "QUEUE_LEASE_SECONDS": "20",
    "RECEIPT_LOCK_SECONDS": "10",
    "CLAIM_IDLE_SECONDS": "5",
    "HTTP_TIMEOUT_SECONDS": "5",
    "RATE_LIMIT_REQUESTS": str(FAKE_RATE_LIMIT),
    "RATE_LIMIT_WINDOW_SECONDS": "60",
    "LOG_LEVEL": "INFO",
}

# How many results of each special kind the adapter sends (the rest are plain ones).
MALFORMED = 7  # one of each _malformed_entries()
UNKNOWN = 2
ALREADY_FISCALISED = 5  # closed, our fiscal_id already on it and locked: no PATCH
CONFLICTING = 3  # another fiscal_id already on it: fiscal_id_conflict
CLOSING_LATER = 5  # open, closes after 2-8 s
APPEARING_LATER = 3  # 404 for 2-5 s, then there
MISSING = 3  # 404 for good: receipt_not_found after the not-ready window
OTHER_VENUE = 3  # demo-cafe receipts of venue 2, sent with venue_id
# (status, count, method) of the transient faults injected on one receipt each
FLAKY = ((500, 1, "GET"), (503, 2, "ANY"), (502, 2, "GET"), (503, 1, "PATCH"), (504, 1, "GET"))
FIXED_KINDS = (
    MALFORMED
    + UNKNOWN
    + ALREADY_FISCALISED
    + CONFLICTING
    + CLOSING_LATER
    + APPEARING_LATER
    + MISSING
    + OTHER_VENUE
    + len(FLAKY)
)
MIN_RESULTS = FIXED_KINDS + 14  # room for a few duplicates and plain results

EXPECTED_REASONS = ("invalid_message", "unknown_brand", "fiscal_id_conflict", "receipt_not_found")
OUTCOMES = ("fiscalised", "already_done", "duplicate", *(f"dead_lettered:{r}" for r in REASONS))


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedReceipt:
    brand: str
    receipt: dict[str, Any]
    close_after: float | None = None
    appear_after: float | None = None
    fault: tuple[int, int, str] | None = None  # fail_next (status, count, method)


@dataclass(frozen=True)
class Send:
    at: float  # seconds after the adapter starts
    fields: dict[str, Any] | None = None  # submit() keyword arguments
    raw: bytes | None = None  # or a malformed `data` field, written with XADD as is
    group: int | None = None  # sends of one group go out at the same moment, from threads


@dataclass
class Plan:
    receipts: list[SeedReceipt]
    sends: list[Send]
    expected: Counter[str]  # outcome counter -> how many the worker must report
    final_fiscal_ids: dict[tuple[str, int], str]  # what each receipt must end up with

    def batches(self) -> list[list[Send]]:
        """The sends in time order; a concurrent group is one batch."""
        grouped: dict[Any, list[Send]] = defaultdict(list)
        for index, send in enumerate(self.sends):
            grouped[("g", send.group) if send.group is not None else ("s", index)].append(send)
        return sorted(grouped.values(), key=lambda batch: batch[0].at)

    @property
    def valid_sends(self) -> int:
        return sum(1 for send in self.sends if send.fields is not None)


def build_plan(total: int, rng: random.Random) -> Plan:
    """`total` stream entries: every outcome (docs/interface.md) a healthy API can produce."""
    if total < MIN_RESULTS:
        raise ValueError(f"the demo needs at least {MIN_RESULTS} results")
    duplicates = max(5, total // 10)
    plain = total - FIXED_KINDS - duplicates
    next_id = {"openapitest": 1001, "demo-cafe": 5001}
    receipts: list[SeedReceipt] = []
    sends: list[Send] = []
    expected: Counter[str] = Counter()
    finals: dict[tuple[str, int], str] = {}
    originals: list[int] = []  # indexes into `sends` a duplicate may copy

    def new_id(brand: str) -> int:
        next_id[brand] += 1
        return next_id[brand] - 1

    def result(brand: str, rid: int, fiscal: str, **extra: Any) -> dict[str, Any]:
        device = f"{'fp' if brand == 'openapitest' else 'cafe'}-printer-{rng.randint(1, 6)}"
        return {
            "brand": brand,
            "receipt_id": rid,
            "fiscal_id": fiscal,
            "device_id": device,
            "result_id": f"res-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}",
            **extra,
        }

    def send(at: float, fields: dict[str, Any], *, copyable: bool = False) -> None:
        if copyable:
            originals.append(len(sends))
        sends.append(Send(at=round(at, 3), fields=fields))

    def brand_pick() -> str:
        return "openapitest" if rng.random() < 0.6 else "demo-cafe"

    early = (0.0, 0.5)  # not-ready receipts go first: their windows start early
    main = (0.0, SEND_SECONDS * 0.8)  # leaves the end for re-sent duplicates
    anytime = (0.0, SEND_SECONDS)

    for _ in range(plain):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid)))
        send(rng.uniform(*main), result(brand, rid, fiscal), copyable=True)
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(ALREADY_FISCALISED):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid, fiscal_id=fiscal, lock=True)))
        send(rng.uniform(*main), result(brand, rid, fiscal), copyable=True)
        expected["already_done"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(CONFLICTING):
        brand, theirs = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid, fiscal_id=theirs, lock=True)))
        send(rng.uniform(*anytime), result(brand, rid, _fiscal_id(rng)))
        expected["dead_lettered:fiscal_id_conflict"] += 1
        finals[(brand, rid)] = theirs  # never overwritten
    for _ in range(CLOSING_LATER):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        delay = round(rng.uniform(2, 8), 1)
        receipts.append(SeedReceipt(brand, _closed(rid), close_after=delay))
        send(rng.uniform(*early), result(brand, rid, fiscal), copyable=True)
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(APPEARING_LATER):
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        delay = round(rng.uniform(2, 5), 1)
        receipts.append(SeedReceipt(brand, _closed(rid), appear_after=delay))
        send(rng.uniform(*early), result(brand, rid, fiscal))
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(MISSING):
        brand = brand_pick()
        send(rng.uniform(*early), result(brand, new_id(brand), _fiscal_id(rng)))
        expected["dead_lettered:receipt_not_found"] += 1
    for fault in FLAKY:
        brand, fiscal = brand_pick(), _fiscal_id(rng)
        rid = new_id(brand)
        receipts.append(SeedReceipt(brand, _closed(rid), fault=fault))
        send(rng.uniform(*main), result(brand, rid, fiscal))
        expected["fiscalised"] += 1
        finals[(brand, rid)] = fiscal
    for _ in range(OTHER_VENUE):
        fiscal = _fiscal_id(rng)
        rid = new_id("demo-cafe")
        receipts.append(SeedReceipt("demo-cafe", _closed(rid, venue_id=2)))
        send(rng.uniform(*anytime), result("demo-cafe", rid, fiscal, venue_id=2))
        expected["fiscalised"] += 1
        finals[("demo-cafe", rid)] = fiscal
    for number in range(UNKNOWN):
        fields = result(UNKNOWN_BRAND, 7001 + number, _fiscal_id(rng))
        send(rng.uniform(*anytime), fields)
        expected["dead_lettered:unknown_brand"] += 1
    for raw in _malformed_entries():
        sends.append(Send(at=round(rng.uniform(0.5, SEND_SECONDS), 3), raw=raw))
        expected["dead_lettered:invalid_message"] += 1

    # Duplicates: the same result again (same result_id), half at the same moment as the
    # original from other threads, half re-sent at the end. Each is absorbed: one PATCH.
    for number in range(duplicates):
        index = rng.choice(originals)
        original = sends[index]
        if number % 2 == 0:
            group = original.group if original.group is not None else index
            sends[index] = Send(original.at, original.fields, group=group)
            sends.append(Send(original.at, original.fields, group=group))
        else:
            at = rng.uniform(max(original.at, SEND_SECONDS * 0.85), SEND_SECONDS)
            sends.append(Send(round(at, 3), original.fields))
        expected["duplicate"] += 1
    return Plan(receipts, sends, expected, finals)


def _closed(rid: int, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "status": 2, "fiscal_id": None, "lock": False} | fields


def _fiscal_id(rng: random.Random) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(rng.choice(alphabet) for _ in range(16))


def _malformed_entries() -> list[bytes]:
    """One entry per way an adapter can get the format wrong; each is invalid_message."""
    hostile = {
        "receipt_id": 13,
        "brand": "\x1b[2J\x1b[31mPWNED\x07\r" + "B" * 300,  # clears a naive terminal
        "fiscal_id": "F\x00\x1b]0;title\x07",
    }
    return [
        b'{"receipt_id": 11, "brand": "openapitest", fiscal_id: F-11',  # not JSON
        b'[{"receipt_id": 12, "brand": "openapitest", "fiscal_id": "F-12"}]',  # an array
        b'{"receipt_id": 13, "brand": "openapitest", "device_id": "fp-printer-1"}',  # no fiscal_id
        b'{"receipt_id": "12", "brand": "openapitest", "fiscal_id": "F-STR"}',  # id as a string
        json.dumps(hostile).encode(),
        json.dumps(
            {"receipt_id": 14, "brand": "openapitest", "fiscal_id": "F-BIG", "note": "x" * 70_000}
        ).encode(),  # over 64 KiB
        b'{"receipt_id": 15, "brand": "openapitest", "fiscal_id": "F-\xff\xfe"}',  # not UTF-8
    ]
