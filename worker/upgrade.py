"""Moving the keys of a Redis written by an older version to the current key layout.

Version 0.1.0's first layout named per-brand keys `fw:<kind>:<brand>...`; the current one
puts every key of one brand under one hash tag, `fw:{b:<brand>}:...` (worker/keys.py). The
data under the old names outlives a deploy: fiscalised markers (duplicates cost no call),
the audit trail, circuits, 429 pauses and the rate budget's reservations,
which parked results still hold. `migrate_keys` renames each old key to its new name, its
TTL kept (RENAME keeps it), so none of that is lost.

Run it with every worker stopped (`fiscal-worker upgrade-keys`): an old and a new worker
would take different receipt locks for one receipt. A key whose new name exists already
(written by a new worker) is left under its old name and reported, never overwritten.
Result records, the schedule, the dead-letter store, counters and the worker registry kept
their names.

Then `fold_receipts` moves the three keys per receipt of the hash-tag layout (audit hash,
attempts list, fiscalised marker: keys.legacy_*) into the one-key receipt record
(keys.receipt, worker/audit.py). The workers read those legacy keys as well until they
expire, so folding is not needed for correctness: it gives their memory back at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from worker import keys
from worker.audit import fold_legacy
from worker.ingest_format import BRAND_PATTERN

SCAN_COUNT = 1_000


@dataclass
class Migration:
    """What `migrate_keys` did (or, dry, would do), counted by kind of key."""

    renamed: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # old keys whose new name exists already
    unknown: list[str] = field(default_factory=list)  # old-looking keys it cannot map
    folded: int = 0  # receipts whose legacy keys went into their one-key record

    def count(self) -> int:
        return sum(self.renamed.values())


def _per_receipt(build: Callable[[str, int], str]) -> Callable[[list[str]], str | None]:
    def new_name(parts: list[str]) -> str | None:
        if len(parts) != 2 or not parts[1].isdigit():
            return None
        return build(parts[0], int(parts[1]))

    return new_name


def _rate(parts: list[str]) -> str | None:
    builders = {
        "tat": keys.rate_tat,
        "front": keys.rate_front,
        "pause": keys.rate_pause,
        "calls": keys.rate_calls,
        "others": keys.rate_others,
    }
    if len(parts) != 2 or parts[1] not in builders:
        return None
    return builders[parts[1]](parts[0])


def _token(parts: list[str]) -> str | None:
    builders = {
        (): keys.token,
        ("refresh-lock",): keys.token_refresh_lock,
        ("auth-failure",): keys.token_auth_failure,
    }
    build = builders.get(tuple(parts[1:]))
    return build(parts[0]) if build else None


def _breaker(parts: list[str]) -> str | None:
    if len(parts) == 1:
        return keys.breaker(parts[0])
    return keys.breaker_probe(parts[0]) if parts[1:] == ["probe"] else None


def _audit(parts: list[str]) -> str | None:
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        return None
    if len(parts) == 3:
        if parts[2] != "attempts":
            return None
        return keys.legacy_audit_attempts(parts[0], int(parts[1]))
    return keys.legacy_audit(parts[0], int(parts[1]))


# Old kind -> the function that maps the rest of an old key name (split on ':') to the new.
OLD_KINDS: dict[str, Callable[[list[str]], str | None]] = {
    "token": _token,
    "rate": _rate,
    "breaker": _breaker,
    "lock": _per_receipt(keys.receipt_lock),
    "fiscalised": _per_receipt(keys.legacy_fiscalised),
    "audit": _audit,
}


def new_name(old: str) -> str | None:
    """The current name of a key of the old layout; None if `old` is not one."""
    prefix, _, rest = old.partition(":")
    kind, _, tail = rest.partition(":")
    if prefix != keys.PREFIX or kind not in OLD_KINDS or not tail:
        return None
    parts = tail.split(":")
    if not BRAND_PATTERN.fullmatch(parts[0]):
        return None
    return OLD_KINDS[kind](parts)


def old_keys(redis_client: redis.Redis) -> Iterator[tuple[str, str]]:
    """(kind, old key) of every key of the old layout in Redis: one SCAN of our prefix (a
    MATCH walks the whole keyspace anyway), keeping the kinds the old layout had."""
    for raw in redis_client.scan_iter(match=f"{keys.PREFIX}:*", count=SCAN_COUNT):
        key = raw.decode() if isinstance(raw, bytes) else raw
        kind = key.split(":", 2)[1]
        if kind in OLD_KINDS:
            yield kind, key


def migrate_keys(redis_client: redis.Redis, *, dry_run: bool = False) -> Migration:
    """Rename every key of the old layout to its current name (RENAMENX: TTLs kept, an
    existing new key never overwritten). Idempotent: a second run finds nothing."""
    done = Migration()
    for kind, old in old_keys(redis_client):
        new = new_name(old)
        if new is None:
            done.unknown.append(old)
            continue
        free = not redis_client.exists(new) if dry_run else redis_client.renamenx(old, new)
        if free:
            done.renamed[kind] = done.renamed.get(kind, 0) + 1
        else:
            done.kept.append(old)
    return done


_LEGACY_RECEIPT_KEY = re.compile(
    re.escape(keys.PREFIX)
    + r":\{b:("
    + BRAND_PATTERN.pattern.strip("^$")
    + r")\}:(?:audit|fiscalised):(\d+)(?::attempts)?"
)


def legacy_receipts(redis_client: redis.Redis) -> Iterator[tuple[str, int]]:
    """(brand, receipt_id) of every receipt with a legacy key (a receipt once), by SCAN."""
    seen: set[tuple[str, int]] = set()
    for raw in redis_client.scan_iter(match=f"{keys.PREFIX}:{{b:*}}:*", count=SCAN_COUNT):
        key = raw.decode() if isinstance(raw, bytes) else raw
        match = _LEGACY_RECEIPT_KEY.fullmatch(key)
        if match is None:
            continue
        receipt = (match.group(1), int(match.group(2)))
        if receipt not in seen:
            seen.add(receipt)
            yield receipt


def fold_receipts(
    redis_client: redis.Redis, *, max_attempts: int, dry_run: bool = False, done: Migration
) -> Migration:
    """Fold every receipt's legacy keys into its record (`fold_legacy`); dry: count them."""
    for brand, receipt_id in legacy_receipts(redis_client):
        if dry_run or fold_legacy(redis_client, brand, receipt_id, max_attempts=max_attempts):
            done.folded += 1
    return done
