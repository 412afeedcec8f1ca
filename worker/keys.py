"""Every Redis key fiscal-worker uses, with its type and lifetime: the whole footprint.

Brands are validated (`A-Za-z0-9_.-`, 1-64 chars) before they reach a key, so a brand can
never smuggle a `:` into another key's namespace. Nothing here grows without a bound: each
key says what bounds it. The ingest stream's name is a setting (contract §2) and is passed in.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "fw"

# list: the Celery queue (kombu's Redis transport); kept short by FISCAL_MAX_QUEUED.
CELERY_QUEUE = "fiscal"

# Consumer group on the ingest stream (stream: bounded by XDEL after each XACK).
INGEST_GROUP = "fiscal-worker"


def token(brand: str) -> str:
    """string: the brand's access token JSON {token, expires_at}; TTL = the token's life."""
    return f"{PREFIX}:token:{brand}"


def token_refresh_lock(brand: str) -> str:
    """string: who is refreshing the brand's token; TTL a few seconds (released on done)."""
    return f"{PREFIX}:token:{brand}:refresh-lock"


def token_auth_failure(brand: str) -> str:
    """string: the last /v2/auth rejection of the brand (no secret); TTL ~10 s, so other
    processes fail fast instead of each spending the auth budget."""
    return f"{PREFIX}:token:{brand}:auth-failure"


def rate_prefix(brand: str) -> str:
    """Prefix of the brand's rate-budget keys (worker/ratelimit.py):
    <prefix>tat     string: next free call slot (unix s); TTL = until it + one window
    <prefix>front   string: next slot ahead of the queue, for results under way; same TTL
    <prefix>pause   string: paused until (after a 429); TTL = the pause
    <prefix>calls   zset: our calls in the last window; trimmed each call, TTL one window
    <prefix>others  string: other clients' estimated use of the budget; TTL one window"""
    return f"{RATE_PREFIX}{brand}:"


RATE_PREFIX = f"{PREFIX}:rate:"  # Lua scripts build rate_prefix(brand) from it


# string: the deployment's next /v2/auth slot (unix s); TTL until it passes.
AUTH_RATE = f"{PREFIX}:auth-rate"


def breaker(brand: str) -> str:
    """hash: the brand's circuit breaker (state, failures, until, cooldown); no TTL while
    open, deleted when it closes. Bounded by the brands with credentials."""
    return f"{PREFIX}:breaker:{brand}"


def breaker_probe(brand: str) -> str:
    """string: the one process probing an open circuit; TTL = probe timeout."""
    return f"{PREFIX}:breaker:{brand}:probe"


def failed_calls(minute: int) -> str:
    """string counter: failed API calls (status >= 400 or none) in one minute, all brands;
    TTL 3 minutes. Keeps retry storms well under Clopos' flood guard (600 failed/min/IP)."""
    return f"{PREFIX}:failed-calls:{minute}"


def result(result_id: str) -> str:
    """hash: one result not finished yet (fields, attempts, dispatch); deleted when it
    finishes (fiscalised or dead-lettered); TTL = both retry windows + a day, as a backstop."""
    return f"{PREFIX}:result:{result_id}"


# zset: result_id -> unix time it is due (to run, or to be re-driven if its lease lapses).
# Holds exactly the unfinished results; bounded by them.
SCHEDULE = f"{PREFIX}:schedule"


def receipt_lock(brand: str, receipt_id: int) -> str:
    """string: the worker that may call the API for this receipt now; TTL ~2 min."""
    return f"{PREFIX}:lock:{brand}:{receipt_id}"


def fiscalised(brand: str, receipt_id: int) -> str:
    """string: the fiscal_id this receipt was fiscalised with; TTL = marker TTL (30 days)."""
    return f"{FISCALISED_PREFIX}{brand}:{receipt_id}"


FISCALISED_PREFIX = f"{PREFIX}:fiscalised:"  # Lua scripts build fiscalised() from it


def audit(brand: str, receipt_id: int) -> str:
    """hash: the worker's record of one receipt (state, fiscal_id, device_id, ...);
    TTL = audit TTL (90 days), renewed on every write."""
    return f"{PREFIX}:audit:{brand}:{receipt_id}"


def audit_attempts(brand: str, receipt_id: int) -> str:
    """list of JSON attempts (time, call, http_status, outcome), newest last, capped
    at audit_max_attempts; same TTL as audit()."""
    return f"{PREFIX}:audit:{brand}:{receipt_id}:attempts"


# Dead-letter store: never trimmed (entries leave only by replay or purge); bounded by the
# results dead-lettered, at most one entry per result id. Past dlq_warn_entries or
# dlq_warn_bytes it warns (log, `dlq stats`, metrics) and keeps everything.
DLQ_SEQ = f"{PREFIX}:dlq:seq"  # string counter: ids are dl-<seq>
DLQ_INDEX = f"{PREFIX}:dlq:index"  # zset id -> seq (newest = highest)
DLQ_COUNTS = f"{PREFIX}:dlq:counts"  # hash reason:<r> / brand:<b> -> count
# string counter: total bytes of the stored entry JSON strings (sum of their STRLEN);
# changed with every add and removal in the same script, never negative (deleted at 0).
DLQ_BYTES = f"{PREFIX}:dlq:bytes"

_RESULT_ID_IN_KEY = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


def dlq_entry(entry_id: str) -> str:
    """string: one dead-letter entry as JSON; lives until replayed or purged."""
    return f"{PREFIX}:dlq:entry:{entry_id}"


def dlq_by_result(result_id: str) -> str:
    """string: the id of the entry dead-lettered for this result id; deleted with it.

    A result id is untrusted: unless it is 1-128 chars of `0-9A-Za-z_.:-` (stream ids
    are), the key holds `sha256:<hex>` of it instead. An id that itself starts with
    `sha256:` is hashed too, so no id can take another's key.
    """
    if _RESULT_ID_IN_KEY.fullmatch(result_id) and not result_id.startswith("sha256:"):
        name = result_id
    else:
        name = "sha256:" + hashlib.sha256(result_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{PREFIX}:dlq:result:{name}"


def dlq_by_reason(reason: str) -> str:
    """zset id -> seq, the entries of one reason (reasons are a fixed set)."""
    return f"{PREFIX}:dlq:reason:{reason}"


def dlq_by_brand(brand: str) -> str:
    """zset id -> seq, the entries of one brand (brand '' = unparsable message)."""
    return f"{PREFIX}:dlq:brand:{brand}"


# zset: worker process (host:pid) -> its last heartbeat (unix s); for `stats`. Bounded by
# the workers of the last hour (older ones are trimmed at each beat).
WORKERS = f"{PREFIX}:workers"


# hash: name -> count; monotonic counters for the CLI, the demo and metrics (fixed names).
COUNTERS = f"{PREFIX}:counters"
