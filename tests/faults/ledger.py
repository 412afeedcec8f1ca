"""The ledger of one fault case: what was sent, and where each result ended up.

From the results sent (brand, receipt_id, fiscal_id and the expected outcome: fiscalised
or a dead-letter reason), the fake API's receipts and stats, and the dead-letter store,
it computes:

    sent            distinct results the case expects an outcome for (xadds: entries written)
    fiscalised      fiscal_id + lock true on the fake's receipt, as expected
    dead-lettered   per reason, as expected
    duplicate PATCH successful PATCHes of one receipt beyond 1; exactly 2 with the same fiscal
                    id are tolerated where a worker kill landed between the two
    max concurrent  PATCHes of one receipt in flight at once (must be <= 1)
    wrong           fiscalised with another fiscal id, dead-lettered for another reason (or a
                    result expected to land dead-lettered), or landed and dead-lettered both
    lost            neither fiscalised nor dead-lettered (must be 0)
    stray           dead-letter entries that belong to nothing this case sent

It balances when sent = fiscalised + dead-lettered (as expected), nothing is wrong or lost
or stray, no duplicate PATCH beyond the tolerated ones and no concurrent PATCH.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from support import dlq_entries, finished

FISCALISED = "fiscalised"
KILL_TOLERANCE_SECONDS = 5.0  # a PATCH this long before a kill may be repeated once after it


@dataclass
class Sent:
    key: str  # "brand:receipt_id" for results, "entry:<stream id>" for raw entries
    expect: str  # FISCALISED or a dead-letter reason
    brand: str | None = None
    receipt_id: int | None = None
    fiscal_id: str | None = None
    data: Any = None  # what was written (the `data` field, or all fields of a raw entry)
    entry_ids: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # unix time of every XADD


@dataclass
class Row:
    key: str
    expect: str
    outcome: str  # ok | wrong | lost
    detail: str = ""


class Ledger:
    def __init__(self, name: str, *, fake: Any, redis: redis.Redis) -> None:
        self.name = name
        self.fake = fake
        self.redis = redis
        self.sent: dict[str, Sent] = {}
        self.by_entry: dict[str, str] = {}
        self.kills: list[float] = []
        self.figures: dict[str, str] = {}
        self.reported = False
        self.text = ""
        self.rows: list[Row] = []
        self.summary: dict[str, Any] = {}
        self.stages: list[str] = []  # tables of earlier checks of a multi-stage case
        self._checked_last = False

    # --- what the case sends -------------------------------------------------------------
    def send(
        self,
        r: redis.Redis,
        brand: str,
        receipt_id: int,
        fiscal_id: str,
        expect: str = FISCALISED,
        *,
        stream: str = "fiscal:results",
        **extra: Any,
    ) -> str:
        """XADD one result (as an adapter does) and expect `expect` for it."""
        payload = json.dumps(
            {"receipt_id": receipt_id, "brand": brand, "fiscal_id": fiscal_id, **extra}
        )
        key = f"{brand}:{receipt_id}"
        entry = self.sent.get(key)
        if entry is None:
            entry = self.sent[key] = Sent(key, expect, brand, receipt_id, fiscal_id, payload)
        entry_id = _xadd(r, stream, {"data": payload})
        self._record(entry, entry_id)
        return entry_id

    def resend(self, r: redis.Redis, key: str, *, stream: str = "fiscal:results") -> str:
        """The adapter writes the same entry again (a duplicate: no second PATCH)."""
        entry = self.sent[key]
        entry_id = _xadd(r, stream, {"data": entry.data})
        self._record(entry, entry_id)
        return entry_id

    def send_raw(
        self,
        r: redis.Redis,
        fields: dict[Any, Any],
        expect: str = "invalid_message",
        *,
        stream: str = "fiscal:results",
    ) -> str:
        """XADD arbitrary fields (hostile input); expected dead-lettered by entry id."""
        entry_id = _xadd(r, stream, fields)
        key = f"entry:{entry_id}"
        entry = self.sent[key] = Sent(key, expect, data=fields)
        self._record(entry, entry_id)
        return entry_id

    def add_raw(self, entry_id: str, fields: dict[Any, Any], expect: str) -> None:
        """Account for a raw entry the case wrote itself (e.g. in a pipeline)."""
        key = f"entry:{entry_id}"
        entry = self.sent[key] = Sent(key, expect, data=fields)
        self._record(entry, entry_id, sent_at=time.time())

    def add_result(self, entry_id: str, brand: str, receipt_id: int, fiscal_id: str) -> None:
        """Account for a valid result the case wrote itself (expected fiscalised)."""
        key = f"{brand}:{receipt_id}"
        entry = self.sent.setdefault(key, Sent(key, FISCALISED, brand, receipt_id, fiscal_id))
        self._record(entry, entry_id, sent_at=time.time())

    def expect(self, key: str, outcome: str) -> None:
        """Change what a result is expected to end as (e.g. after a replay)."""
        self.sent[key].expect = outcome

    def kill(self, at: float | None = None) -> None:
        """A worker was killed now: one repeated PATCH around it is tolerated."""
        self.kills.append(time.time() if at is None else at)

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = value if isinstance(value, str) else _fmt(value)

    def _record(self, entry: Sent, entry_id: str, sent_at: float | None = None) -> None:
        entry.entry_ids.append(entry_id)
        entry.sent_at.append(time.time() if sent_at is None else sent_at)
        self.by_entry[entry_id] = entry.key

    # --- waiting until nothing moves -----------------------------------------------------
    def settle(
        self, timeout: float, *, quiet: float = 1.0, extra: Callable[[], bool] | None = None
    ) -> bool:
        """Wait until every result is finished (schedule and stream empty), the fake has
        seen no request for `quiet` seconds and `extra()` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            try:
                count = len(self.fake.stats()["request_log"])
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                done = finished(self.redis) and (extra is None or extra())
            except redis.RedisError:
                done = False
            if done and time.monotonic() - last_change >= quiet:
                return True
            time.sleep(0.2)
        return False

    # --- the books -----------------------------------------------------------------------
    def compute(self, note: str = "") -> dict[str, Any]:
        self._checked_last = False
        stats = self.fake.stats()
        entries = dlq_entries(self.redis)
        dead: dict[str, list[dict[str, Any]]] = {}
        stray: list[dict[str, Any]] = []
        for item in entries:
            key = self.by_entry.get(str(item.get("result_id")))
            if key is None and item.get("brand") is not None:
                candidate = f"{item['brand']}:{item.get('receipt_id')}"
                key = candidate if candidate in self.sent else None
            if key is None:
                stray.append(item)
            else:
                dead.setdefault(key, []).append(item)

        rows: list[Row] = []
        by_reason: Counter[str] = Counter()
        expected: Counter[str] = Counter(entry.expect for entry in self.sent.values())
        fiscalised = duplicates = tolerated = max_concurrent = 0
        doubled: list[str] = []
        overlapping: list[str] = []
        for key, entry in self.sent.items():
            reasons = [d["reason"] for d in dead.get(key, [])]
            landed = got = False
            if entry.brand is not None and entry.receipt_id is not None:
                receipt = self.fake.receipt(entry.brand, entry.receipt_id) or {}
                got = receipt.get("fiscal_id")
                landed = got == entry.fiscal_id and receipt.get("lock") is True
                counts = stats["receipts"].get(key, {})
                max_concurrent = max(max_concurrent, counts.get("max_concurrent_patches", 0))
                extra_patches = max(0, counts.get("patch_ok", 0) - 1)
                if extra_patches and self._tolerated(counts, entry.fiscal_id):
                    tolerated += extra_patches
                elif extra_patches:
                    duplicates += extra_patches
                    doubled.append(f"{key} x{counts['patch_ok']}")
                if counts.get("max_concurrent_patches", 0) > 1:
                    overlapping.append(key)
            if landed:
                fiscalised += 1
            for reason in set(reasons):
                by_reason[reason] += 1
            row = self._row(entry, landed, got, reasons)
            if row.outcome == "wrong" and dead.get(key):
                row.detail += f" error={str(dead[key][0].get('error'))[:120]!r}"
            rows.append(row)

        wrong = [row for row in rows if row.outcome == "wrong"]
        lost = [row for row in rows if row.outcome == "lost"]
        ok_dead = sum(1 for row in rows if row.outcome == "ok" and row.expect != FISCALISED)
        ok_landed = sum(1 for row in rows if row.outcome == "ok" and row.expect == FISCALISED)
        balanced = (
            len(self.sent) == ok_landed + ok_dead + len(wrong) + len(lost)
            and not wrong
            and not lost
            and not stray
            and duplicates == 0
            and max_concurrent <= 1
        )
        self.rows = rows
        self.summary = {
            "sent": len(self.sent),
            "xadds": sum(len(e.entry_ids) for e in self.sent.values()),
            "expected": dict(expected),
            "fiscalised": fiscalised,
            "dead_lettered": dict(by_reason),
            "duplicate_patches": duplicates,
            "tolerated_patches": tolerated,
            "max_concurrent_patches": max_concurrent,
            "wrong": len(wrong),
            "lost": len(lost),
            "stray": len(stray),
            "balanced": balanced,
            "note": note,
            "doubled": doubled,
            "overlapping": overlapping,
            "stray_sample": [
                {k: s.get(k) for k in ("id", "reason", "brand", "receipt_id", "error")}
                for s in stray[:3]
            ],
        }
        self.reported = True
        self.text = self._table()
        return self.summary

    def check(self, settled: bool = True, stage: str = "") -> dict[str, Any]:
        """Compute the books and assert they balance (the table is the failure message).
        With `stage`, the table is kept as that stage's and a later check adds the next."""
        note = "" if settled else "did NOT settle within its timeout"
        summary = self.compute(f"{stage}; {note}" if stage and note else stage or note)
        self.stages.append(self._table())
        self._checked_last = True
        assert summary["balanced"], "ledger does not balance:\n" + self._table()
        return summary

    def render(self) -> str:
        if self.summary:
            self.text = self._table()  # figures may have been added after the check
        current = self.text or f"ledger {self.name}: not computed"
        # Every check's table but the last one (the current table shows it, with figures).
        earlier = self.stages[:-1] if self.stages and self._checked_last else self.stages
        return "\n".join([*earlier, current])

    def _tolerated(self, counts: dict[str, Any], fiscal_id: str | None) -> bool:
        times = counts.get("patched_at", [])
        bodies = counts.get("patch_bodies", [])
        same = all(b.get("fiscal_id", fiscal_id) == fiscal_id for b in bodies)
        if len(times) != 2 or not same:
            return False
        return any(times[0] <= k + KILL_TOLERANCE_SECONDS and times[1] >= k for k in self.kills)

    @staticmethod
    def _row(entry: Sent, landed: bool, got: Any, reasons: list[str]) -> Row:
        if entry.expect == FISCALISED:
            if landed and not reasons:
                return Row(entry.key, entry.expect, "ok")
            if reasons or (got and got != entry.fiscal_id):
                detail = f"fiscal_id={got!r} dead-lettered={reasons}"
                return Row(entry.key, entry.expect, "wrong", detail)
            return Row(entry.key, entry.expect, "lost", f"fiscal_id={got!r}")
        if landed or (got and got == entry.fiscal_id):
            return Row(entry.key, entry.expect, "wrong", f"fiscalised; dead-lettered={reasons}")
        if not reasons:
            return Row(entry.key, entry.expect, "lost")
        if set(reasons) != {entry.expect}:
            return Row(entry.key, entry.expect, "wrong", f"dead-lettered={reasons}")
        return Row(entry.key, entry.expect, "ok")

    def _table(self) -> str:
        s = self.summary
        expected = s["expected"]
        lines = [
            f"ledger {self.name}" + (f"  [{s['note']}]" if s["note"] else ""),
            f"  {'':<34}{'expected':>10}{'actual':>10}",
            f"  {'sent (xadds ' + str(s['xadds']) + ')':<34}{s['sent']:>10}{s['sent']:>10}",
            f"  {'fiscalised':<34}{expected.get(FISCALISED, 0):>10}{s['fiscalised']:>10}",
        ]
        reasons = sorted(set(expected) - {FISCALISED} | set(s["dead_lettered"]))
        for reason in reasons:
            label = f"dead-lettered {reason}"
            lines.append(
                f"  {label:<34}{expected.get(reason, 0):>10}{s['dead_lettered'].get(reason, 0):>10}"
            )
        dup = str(s["duplicate_patches"])
        if s["tolerated_patches"]:
            dup += f" (+{s['tolerated_patches']} tolerated)"
        lines += [
            f"  {'duplicate PATCHes':<34}{0:>10}{dup:>10}",
            f"  {'max concurrent PATCHes':<34}{'<=1':>10}{s['max_concurrent_patches']:>10}",
            f"  {'wrong':<34}{0:>10}{s['wrong']:>10}",
            f"  {'lost':<34}{0:>10}{s['lost']:>10}",
            f"  {'stray dead letters':<34}{0:>10}{s['stray']:>10}",
            f"  balanced: {'yes' if s['balanced'] else 'NO'}",
        ]
        bad = [row for row in self.rows if row.outcome != "ok"]
        for row in bad[:8]:
            lines.append(f"    {row.outcome}: {row.key} expected {row.expect} {row.detail}")
        if len(bad) > 8:
            lines.append(f"    ... {len(bad) - 8} more")
        if s["doubled"]:
            lines.append(f"    PATCHed more than once: {', '.join(s['doubled'][:8])}")
        if s["overlapping"]:
            lines.append(f"    concurrent PATCHes on: {', '.join(s['overlapping'][:8])}")
        for stray in s["stray_sample"]:
            lines.append(f"    stray: {stray}")
        if self.figures:
            lines.append("  figures:")
            lines += [f"    {name:<34}{value}" for name, value in self.figures.items()]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _xadd(r: redis.Redis, stream: str, fields: dict[Any, Any]) -> str:
    entry_id = r.xadd(stream, fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
