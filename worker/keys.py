"""Every Redis key fiscal-worker uses, with its type and lifetime: the whole footprint.

Every key name, prefix and scan pattern is built here, in Python; the Lua scripts
(worker/scripts/) get every key they touch through KEYS. Brands are validated
(`A-Za-z0-9_.-`, 1-64 chars) before they reach a key, so a brand can never smuggle a `:`,
`{` or `}` into another key's namespace. Nothing here grows without a bound: each key says
what bounds it. The ingest stream's name is a setting and is passed in.

Layout
------
Per-brand keys share the hash tag `{b:<brand>}`, so in a Redis Cluster every key of one
brand lives in one slot and a script that touches only one brand's keys touches one slot:

    fw:{b:<brand>}:token                    fw:{b:<brand>}:breaker
    fw:{b:<brand>}:token:refresh-lock       fw:{b:<brand>}:breaker:probe
    fw:{b:<brand>}:token:auth-failure       fw:{b:<brand>}:lock:<receipt_id>
    fw:{b:<brand>}:rate:tat|front|pause|calls|others
    fw:{b:<brand>}:rcpt:<receipt_id>        (the receipt's record and fiscalised marker)
    fw:{b:<brand>}:fiscalised:<receipt_id>  fw:{b:<brand>}:audit:<receipt_id>[:attempts] (legacy)
    fw:{b:<brand>}:last-success

Global keys (no hash tag: each is placed by its whole name, so two share a slot only by
chance):

    fw:schedule, fw:result:<rid>            the unfinished results (worker/store.py)
    fw:dlq:*                                the dead-letter store, its indexes (one of them
                                            per brand, fw:dlq:brand:<brand>, kept with the
                                            others: the DLQ scripts change them together),
                                            counts and size
    fw:counters, fw:latency, fw:workers, fw:brands, fw:auth-calls, fw:auth-hold,
    fw:failed-calls:<minute>
    fw:oplog                                the operator log (worker/oplog.py)
    fw:web:session:<sha256>, fw:web:login-failures:<sha256>   the console (worker/web/)
    fiscal (and kombu's own keys)           the Celery queue
    the ingest stream                       a setting (default fiscal:results)

Cluster readiness, not Cluster support
--------------------------------------
Single-slot scripts (one brand's keys, or one key): ratelimit_reserve, ratelimit_pause,
ratelimit_take, ratelimit_observe, ratelimit_auth_hold, breaker_allow, breaker_record,
gate_record,
idempotency_acquire / _extend / _release / _hold_in_flight, receipt_set_state,
receipt_attempt,
tokens_unlock, tokens_drop_if_current, ingest_read, ingest_prune, ingest_oldest_id, dlq_head.

Scripts that cross slots (and so would not run on a Redis Cluster as they are):
    store_admit       the schedule, result records, and the rate, breaker and receipt
                      keys of every brand among the results it admits
    store_fence       a receipt lock (per brand) with a result record and the schedule
    gate_check        the same, with the brand's breaker, pause and rate keys
    ratelimit_auth_reserve  the auth call log and the auth hold (two global keys)
    store_create, store_begin, store_renew, store_hold, store_published,
    store_reschedule  a result record (or several) with the schedule
    dlq_add, dlq_remove  the dead-letter keys (global, untagged)
    web_login_attempt the console's two failed-login counters (global, untagged)
    dlq_replay        the ingest stream with the dead-letter keys
Likewise the MULTI/EXEC transactions that settle a result (its record, the schedule, the
fiscalised marker, the audit trail, the dead-letter store, the counters) span slots.
Atomicity across those keys is what keeps every result exactly once in effect, so running
on a Cluster would need the global keys tagged and those steps redesigned: not done here.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "fw"

# list: the Celery queue (kombu's Redis transport); kept short by FISCAL_MAX_QUEUED.
CELERY_QUEUE = "fiscal"

# Consumer group on the ingest stream (stream: bounded by XDEL after each XACK).
INGEST_GROUP = "fiscal-worker"


# --- per brand: one hash tag, one Cluster slot --------------------------------------------


def _brand(brand: str) -> str:
    """The brand's namespace, `fw:{b:<brand>}`: the hash tag every key of the brand shares."""
    return f"{PREFIX}:{{b:{brand}}}"


_BRAND_KEY = re.compile(re.escape(PREFIX) + r":\{b:([^}]*)\}:")


def brand_of(key: str) -> str | None:
    """The brand a per-brand key belongs to (the inside of its hash tag), or None."""
    match = _BRAND_KEY.match(key)
    return match.group(1) if match else None


def token(brand: str) -> str:
    """string: the brand's access token JSON {token, expires_at}; TTL = the token's life."""
    return f"{_brand(brand)}:token"


def token_refresh_lock(brand: str) -> str:
    """string: who is refreshing the brand's token; TTL a few seconds (released on done)."""
    return f"{_brand(brand)}:token:refresh-lock"


def token_auth_failure(brand: str) -> str:
    """string: the last /v2/auth rejection of the brand (no secret); TTL ~10 s, so other
    processes fail fast instead of each spending the auth budget."""
    return f"{_brand(brand)}:token:auth-failure"


# The brand's rate-budget keys (worker/ratelimit.py).


def last_success(brand: str) -> str:
    """string: unix time of the brand's last fiscalised result, for the console; lapses
    BRAND_REGISTRY_SECONDS after it (set again with each success)."""
    return f"{_brand(brand)}:last-success"


def rate_tat(brand: str) -> str:
    """string: the brand's next free call slot (unix s); TTL = until it + one window."""
    return f"{_brand(brand)}:rate:tat"


def rate_front(brand: str) -> str:
    """string: the next slot ahead of the queue, for results under way; TTL as rate_tat."""
    return f"{_brand(brand)}:rate:front"


def rate_pause(brand: str) -> str:
    """string: paused until (unix s, after a 429); TTL = the pause."""
    return f"{_brand(brand)}:rate:pause"


def rate_calls(brand: str) -> str:
    """zset: our calls in the last window (member -> unix s); trimmed at each call, TTL one
    window."""
    return f"{_brand(brand)}:rate:calls"


def rate_others(brand: str) -> str:
    """string: other clients' estimated use of the budget; TTL one window."""
    return f"{_brand(brand)}:rate:others"


def breaker(brand: str) -> str:
    """hash: the brand's circuit breaker (fields BREAKER_*: state, failures, until,
    cooldown, opened_at); no TTL while open, deleted when it closes. Bounded by the brands
    with credentials."""
    return f"{_brand(brand)}:breaker"


# The breaker hash's layout: written by worker/scripts/breaker_*.lua (their headers list
# these), read by CircuitBreaker.state() and by admission (store_admit gets the field names
# and the open value through ARGV).
BREAKER_STATE = "state"  # BREAKER_OPEN or BREAKER_CLOSED
BREAKER_FAILURES = "failures"  # consecutive failures
BREAKER_UNTIL = "until"  # while open: no call before this (unix s)
BREAKER_COOLDOWN = "cooldown"  # the current cool-down (s), doubled on each failed probe
BREAKER_OPENED_AT = "opened_at"  # when it opened (unix s)
BREAKER_FIELDS = (
    BREAKER_STATE,
    BREAKER_FAILURES,
    BREAKER_UNTIL,
    BREAKER_COOLDOWN,
    BREAKER_OPENED_AT,
)
BREAKER_OPEN = "open"
BREAKER_CLOSED = "closed"


def breaker_probe(brand: str) -> str:
    """string: the one process probing an open circuit; TTL = probe timeout."""
    return f"{_brand(brand)}:breaker:probe"


def receipt_lock(brand: str, receipt_id: int | str) -> str:
    """string: the worker that may call the API for this receipt now; TTL ~2 min."""
    return f"{_brand(brand)}:lock:{receipt_id}"


def receipt(brand: str, receipt_id: int | str) -> str:
    """hash: the worker's record of one receipt, which is also its fiscalised marker (state
    `f` and its fiscal_id: a duplicate costs no API call while it lives). One key per
    receipt, short field names so Redis keeps it in its compact (listpack) encoding:

        s  state: p (pending), f (fiscalised), d (dead-lettered)
        f  fiscal_id          d  device_id         r  result_id       v  venue_id
        t  printed_at         x  extras (JSON)     q  dlq_id          u  updated (unix ms)
        n  attempts so far   a0 .. a<max-1>  the last audit_max_attempts of them, a ring:
           the i-th in a<(i-1) % max>, each `<unix ms> <call> <status|-> <outcome>`

    TTL = the audit window (FISCAL_AUDIT_TTL_SECONDS), or the fiscalised marker's
    (FISCAL_FISCALISED_MARKER_TTL_SECONDS) if longer once fiscalised; renewed on every
    write (worker/audit.py). receipt("*", "*") is a scan pattern matching every record."""
    return f"{_brand(brand)}:rcpt:{receipt_id}"


# The layout before the one-key record: three keys per receipt (audit hash, attempts list,
# fiscalised marker). Still read (a record written before the upgrade keeps its meaning
# until it expires), never written; `fiscal-worker upgrade-keys` folds them into receipt()
# records (worker/upgrade.py).


def legacy_fiscalised(brand: str, receipt_id: int | str) -> str:
    """string (legacy): the fiscal_id this receipt was fiscalised with; TTL 30 days."""
    return f"{_brand(brand)}:fiscalised:{receipt_id}"


def legacy_audit(brand: str, receipt_id: int | str) -> str:
    """hash (legacy): the worker's record of one receipt (state, fiscal_id, device_id, ...);
    TTL 90 days. legacy_audit("*", "*") matches its attempts lists too."""
    return f"{_brand(brand)}:audit:{receipt_id}"


def legacy_audit_attempts(brand: str, receipt_id: int | str) -> str:
    """list (legacy) of JSON attempts (at, call, http_status, outcome), newest last."""
    return f"{legacy_audit(brand, receipt_id)}:attempts"


# --- global --------------------------------------------------------------------------------

# zset: the deployment's /v2/auth calls of the last minute (member: unique, score: when it
# goes, unix s; a call may be booked ahead); TTL a window past the last.
AUTH_CALLS = f"{PREFIX}:auth-calls"
# string: no /v2/auth call before this (unix s): the API said the IP's minute is nearly
# used up (RateLimit-Remaining at the others' reserve, or a 429); TTL until then.
AUTH_HOLD = f"{PREFIX}:auth-hold"


def failed_calls(minute: int) -> str:
    """string counter: failed API calls (status >= 400 or none) in one minute, all brands;
    TTL 3 minutes. Keeps retry storms well under Clopos' flood guard (600 failed/min/IP)."""
    return f"{PREFIX}:failed-calls:{minute}"


def result(rid: str) -> str:
    """hash: one result not finished yet (fields, attempts, dispatch, deadline); no TTL:
    deleted when it finishes (fiscalised or dead-lettered), which it does by its deadline
    at the latest (worker/store.py). Bounded by the unfinished results. result("*") is the
    scan pattern of every record."""
    return f"{PREFIX}:result:{rid}"


# zset: rid -> unix time it is due (to run, or to be re-driven if its lease lapses).
# Holds exactly the unfinished results; bounded by them.
SCHEDULE = f"{PREFIX}:schedule"


# Dead-letter store: never trimmed (entries leave only by replay or purge); bounded by the
# results dead-lettered, at most one entry per result (rid). Past dlq_warn_entries or
# dlq_warn_bytes it warns (log, `dlq stats`, metrics) and keeps everything.
DLQ_SEQ = f"{PREFIX}:dlq:seq"  # string counter: ids are dl-<seq>
DLQ_INDEX = f"{PREFIX}:dlq:index"  # zset id -> commit order (dlq_add.lua; newest highest)
DLQ_COUNTS = f"{PREFIX}:dlq:counts"  # hash reason:<r> / brand:<b> -> count
# string counter: total bytes of the stored entry JSON strings (sum of their STRLEN);
# changed with every add and removal in the same script, never negative (deleted at 0).
DLQ_BYTES = f"{PREFIX}:dlq:bytes"
# string counter: the dead-letter indexes' last score (commit order; see dlq_add.lua). Every
# worker and console of a deployment must run a version that keeps it (an older one scores
# by seq alone, which can tie with or fall below scores given here): upgrade them together.
DLQ_ORDER = f"{PREFIX}:dlq:order"
# hash: hour (unix time // 3600) -> entries added in it; the console's trend. Bounded: hours
# older than two days are deleted by dlq_add.
DLQ_HOURLY = f"{PREFIX}:dlq:hourly"
DLQ_PATTERN = f"{PREFIX}:dlq:*"  # scan pattern: every dead-letter key

_RID_IN_KEY = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


def dlq_entry(entry_id: str) -> str:
    """string: one dead-letter entry as JSON; lives until replayed or purged."""
    return f"{PREFIX}:dlq:entry:{entry_id}"


def dlq_by_result(rid: str) -> str:
    """string: the id of the entry dead-lettered for this result (its rid); deleted with it.

    An id read back from the store is untrusted: unless it is 1-128 chars of
    `0-9A-Za-z_.:-` (stream ids are), the key holds `sha256:<hex>` of it instead. An id that
    itself starts with `sha256:` is hashed too, so no id can take another's key.
    """
    if _RID_IN_KEY.fullmatch(rid) and not rid.startswith("sha256:"):
        name = rid
    else:
        name = "sha256:" + hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{PREFIX}:dlq:result:{name}"


def dlq_by_reason(reason: str) -> str:
    """zset id -> commit order, the entries of one reason (reasons are a fixed set)."""
    return f"{PREFIX}:dlq:reason:{reason}"


def dlq_by_brand(brand: str) -> str:
    """zset id -> commit order, the entries of one brand (brand '' = unparsable message). Global,
    not under the brand's hash tag: the DLQ scripts change it with the other DLQ keys."""
    return f"{PREFIX}:dlq:brand:{brand}"


# zset: worker process (host:pid) -> its last heartbeat (unix s); for `stats`. Bounded by
# the workers of the last hour (older ones are trimmed at each beat).
WORKERS = f"{PREFIX}:workers"


# hash: name -> count; monotonic counters for the CLI, the demo and metrics (fixed names).
COUNTERS = f"{PREFIX}:counters"

# hash: "<since>:<bucket>" / "<since>:sum" -> value; the end-to-end latency
# histogram (worker/telemetry.py). Fixed fields: bounded by the buckets.
LATENCY = f"{PREFIX}:latency"

# stream: the operator log, one entry per replay or purge (who, when, what, how many), from
# the console and the CLI alike (worker/oplog.py). Bounded: trimmed to about OPLOG_MAXLEN.
OPLOG = f"{PREFIX}:oplog"
OPLOG_MAXLEN = 100_000

# The operator's console (worker/web/). A session, under the SHA-256 of its cookie (so the
# cookie itself is never in Redis): a hash that lapses when unused for the session's
# lifetime. Failed logins, per user and per client address: a counter with a short TTL.
WEB_PREFIX = f"{PREFIX}:web"


def web_session(digest: str) -> str:
    return f"{WEB_PREFIX}:session:{digest}"


def web_login_failures(digest: str) -> str:
    return f"{WEB_PREFIX}:login-failures:{digest}"


# zset: brand -> the last time a worker that has its credentials beat (unix s). The brands
# the exporter reports, without scanning the keyspace; bounded by the brands configured in
# the last BRAND_REGISTRY_SECONDS (older ones are trimmed at each beat).
BRANDS = f"{PREFIX}:brands"
BRAND_REGISTRY_SECONDS = 7 * 86400
