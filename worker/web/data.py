"""What the console's pages show, read from Redis: plain dicts for the templates.

The overview and brands pages build on `worker.status.collect` (the numbers of `fiscal-worker
stats` and the metrics) and add what a person looks for first: the problems, the trend of
the dead-letter store, each brand's last success and whether it has a token. The token is
never read: only its key's remaining lifetime.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from worker import keys, status
from worker.audit import AuditTrail
from worker.dlq import DeadLetterStore, Selection
from worker.settings import Settings

INGEST_LAG_WARN_SECONDS = 30.0  # the oldest unsettled stream entry older than this: a problem
OLDEST_DUE_WARN_SECONDS = 60.0  # a due result waiting longer than this past its time
TREND_HOURS = 24
RECEIPT_DLQ_LIMIT = 20  # dead-letter entries shown on a receipt's page


def overview(redis_client: redis.Redis, settings: Settings) -> dict[str, Any]:
    state = status.collect(redis_client, settings)
    store = _store(redis_client, settings)
    trend = store.trend(TREND_HOURS)
    brands = _brand_rows(redis_client, state)
    return {
        "state": state,
        "trend": trend,
        "trend_max": max(trend) if any(trend) else 1,
        "brands": brands,
        "problems": problems(state, trend, brands),
        "at": time.time(),
    }


def brands(redis_client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    return _brand_rows(redis_client, status.collect(redis_client, settings))


def problems(
    state: dict[str, Any], trend: list[int], brand_rows: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """What needs a person, most serious first: {"level": "bad"|"warn", "text"}."""
    found: list[dict[str, str]] = []
    results, dead = state["results"], state["dead_letters"]
    if state["workers"] == 0:
        found.append({"level": "bad", "text": "no worker is alive (no heartbeat)"})
    for row in brand_rows:
        if row["circuit"] != "closed":
            found.append(
                {"level": "bad", "text": f"brand {row['brand']}: circuit {row['circuit']}"}
            )
    if results["ingest_lag_seconds"] > INGEST_LAG_WARN_SECONDS:
        found.append(
            {"level": "bad", "text": f"ingest lags {results['ingest_lag_seconds']:.0f} s behind"}
        )
    if dead["over_bound"]:
        found.append({"level": "bad", "text": "the dead-letter store is over its bound"})
    if state["redis"]["evicting"]:
        found.append({"level": "bad", "text": "Redis may evict keys (maxmemory-policy)"})
    if trend and trend[-1] > 0:
        found.append({"level": "warn", "text": f"{trend[-1]} dead letter(s) added this hour"})
    if results["oldest_due_seconds"] > OLDEST_DUE_WARN_SECONDS:
        found.append(
            {"level": "warn",
             "text": f"a due result waits {results['oldest_due_seconds']:.0f} s past its time"}
        )  # fmt: skip
    for row in brand_rows:
        if row["paused_for_seconds"]:
            found.append(
                {"level": "warn",
                 "text": f"brand {row['brand']}: paused by a 429 for "
                         f"{row['paused_for_seconds']:.0f} s"}
            )  # fmt: skip
    return found


def _brand_rows(redis_client: redis.Redis, state: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(state["brands"])
    now = time.time()
    with redis_client.pipeline(transaction=False) as pipe:
        for brand in names:
            pipe.get(keys.last_success(brand))
            pipe.pttl(keys.token(brand))  # the token's lifetime only; its value is never read
            pipe.exists(keys.token_auth_failure(brand))
        replies = pipe.execute() if names else []
    dead_by_brand = state["dead_letters"]["by_brand"]
    rows = []
    for index, brand in enumerate(names):
        last, token_ms, auth_failing = replies[3 * index : 3 * index + 3]
        budget, breaker = state["brands"][brand]["budget"], state["brands"][brand]["breaker"]
        rows.append(
            {
                "brand": brand,
                "calls_in_window": budget["calls_in_window"],
                "limit": budget["limit"],
                "window_seconds": budget["window_seconds"],
                "use": budget["calls_in_window"] / budget["limit"] if budget["limit"] else 0,
                "others_estimate": budget["others_estimate"],
                "backlog_seconds": budget["backlog_seconds"],
                "paused_for_seconds": budget["paused_for_seconds"],
                "circuit": breaker["state"],
                "failures": breaker.get("failures", 0),
                "opens_again_in_seconds": breaker.get("opens_again_in_seconds"),
                "last_success_ago": _ago(last, now),
                "token": _token_state(token_ms, bool(auth_failing)),
                "dead_letters": dead_by_brand.get(brand, 0),
            }
        )
    return rows


def _token_state(pttl: int | None, auth_failing: bool) -> str:
    if auth_failing:
        return "auth failing"
    if pttl is None or pttl == -2:
        return "none cached"
    if pttl == -1:
        return "cached"
    return f"cached, {pttl / 1000 / 60:.0f} min left"


def _ago(value: Any, now: float) -> float | None:
    try:
        return max(0.0, now - float(value)) if value is not None else None
    except ValueError:
        return None


def receipt(
    redis_client: redis.Redis, settings: Settings, brand: str, receipt_id: int
) -> dict[str, Any]:
    """The worker's record of one receipt with its audit trail, and its dead letters."""
    trail = AuditTrail.from_settings(redis_client, settings)
    store = _store(redis_client, settings)
    record = trail.get(brand, receipt_id)
    page = store.page(Selection(brand=brand, receipt_id=receipt_id), limit=RECEIPT_DLQ_LIMIT)
    entries = list(page.entries)
    listed = {entry.get("id") for entry in entries}
    dlq_id = record.get("dlq_id") if record else None
    if dlq_id and dlq_id not in listed:  # beyond the page's scan: the record names it
        entries += [head for head in store.heads([dlq_id]) if head is not None]
    return {
        "record": record,
        "dead_letters": entries,
        "partial": page.partial,
        "window": trail.window(),
    }


def _store(redis_client: redis.Redis, settings: Settings) -> DeadLetterStore:
    return DeadLetterStore(
        redis_client, warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
    )
