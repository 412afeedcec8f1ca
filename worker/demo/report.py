"""What the demo prints: progress while it waits, then the outcome against the plan (the
counters, the exactly-once check of the fake API's log) and the dead-letter store through
the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from worker import keys
from worker.demo.plan import EXPECTED_REASONS, MALFORMED, OUTCOMES, STREAM, Plan
from worker.dlq import REASONS, DeadLetterStore
from worker.fake_clopos import FakeClopos

CLI_TIMEOUT = 30.0  # one `fiscal-worker dlq ...` subprocess
PROGRESS_SECONDS = 1.0  # one progress line this often (when stdout is not a terminal)


# --- watching ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    counters: dict[str, int]
    pending: int  # results not finished (the schedule)
    stream: int  # entries not settled yet (acknowledged ones are deleted)

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def dead_lettered(self) -> int:
        return sum(n for name, n in self.counters.items() if name.startswith("dead_lettered:"))

    @property
    def settled(self) -> int:
        done = ("fiscalised", "already_done", "duplicate")
        return sum(self.get(name) for name in done) + self.dead_lettered


def snapshot(client: redis.Redis) -> Snapshot:
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.COUNTERS)
        pipe.zcard(keys.SCHEDULE)
        pipe.xlen(STREAM)
        counters, pending, stream = pipe.execute()
    return Snapshot({str(k): int(v) for k, v in counters.items()}, int(pending), int(stream))


def progress_line(elapsed: float, sent: int, total: int, snap: Snapshot) -> str:
    fiscalised = snap.get("fiscalised") + snap.get("already_done")
    return (  # fits 80 columns
        f"[{elapsed:4.1f}s] sent {sent}/{total}  fiscalised {fiscalised}  "
        f"duplicates {snap.get('duplicate')}  dead-lettered {snap.dead_lettered}  "
        f"pending {snap.pending}"
    )


class Progress:
    """One line per second on a pipe; a single live line on a terminal."""

    def __init__(self) -> None:
        self.live: Any = None
        self.last = 0.0
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(highlight=False), refresh_per_second=4)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def show(self, line: str, force: bool = False) -> None:
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(line, no_wrap=True, overflow="ellipsis"))
            return
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(line, flush=True)


# --- checks ----------------------------------------------------------------------------------


@dataclass
class OnceCheck:
    problems: list[str] = field(default_factory=list)  # breaches of exactly-once
    not_fiscalised: list[str] = field(default_factory=list)  # receipts left without ours
    receipts_patched: int = 0
    max_concurrent: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def exactly_once(fake: FakeClopos, stats: dict[str, Any], plan: Plan) -> OnceCheck:
    """Each receipt: at most one successful PATCH, never two fiscal_ids, never overwritten,
    never two PATCHes in flight at once."""
    check = OnceCheck()
    ok_patches: Counter[tuple[str, int]] = Counter()
    for _at, method, brand, rid, status in stats["request_log"]:
        if method == "PATCH" and status == 200 and brand is not None and rid is not None:
            ok_patches[(brand, int(rid))] += 1
    check.receipts_patched = len(ok_patches)
    for (brand, rid), count in sorted(ok_patches.items()):
        if count > 1:
            check.problems.append(f"{brand}:{rid} was PATCHed successfully {count} times")
    for name, entry in sorted(stats["receipts"].items()):
        sent_ids = {b["fiscal_id"] for b in entry["patch_bodies"] if "fiscal_id" in b}
        if len(sent_ids) > 1:
            check.problems.append(f"{name} got PATCHes with {len(sent_ids)} different fiscal_ids")
        check.max_concurrent = max(check.max_concurrent, entry["max_concurrent_patches"])
        if entry["max_concurrent_patches"] > 1:
            check.problems.append(
                f"{name} had {entry['max_concurrent_patches']} PATCHes in flight at once"
            )
    for (brand, rid), want in sorted(plan.final_fiscal_ids.items()):
        receipt = fake.receipt(brand, rid) or {}
        got = receipt.get("fiscal_id")
        if got is not None and got != want:
            check.problems.append(f"{brand}:{rid} was overwritten: {got!r}, not {want!r}")
        elif got is None or receipt.get("lock") is not True:
            check.not_fiscalised.append(f"{brand}:{rid}")
    return check


def outcome_differences(snap: Snapshot, plan: Plan, check: OnceCheck) -> list[str]:
    names = sorted(set(plan.expected) | {n for n in snap.counters if n in OUTCOMES})
    differences = [
        f"{name}: {snap.get(name)}, planned {plan.expected.get(name, 0)}"
        for name in names
        if snap.get(name) != plan.expected.get(name, 0)
    ]
    if check.not_fiscalised:
        shown = ", ".join(check.not_fiscalised[:5])
        differences.append(f"{len(check.not_fiscalised)} receipts not fiscalised: {shown}")
    return differences


def api_calls(stats: dict[str, Any]) -> dict[str, int]:
    log = stats["request_log"]
    return {
        "auth": sum(stats["auth_calls"].values()),
        "GET": sum(1 for entry in log if entry[1] == "GET"),
        "PATCH": sum(1 for entry in log if entry[1] == "PATCH"),
        "429": sum(1 for entry in log if entry[4] == 429),
        "5xx": sum(1 for entry in log if entry[4] >= 500),
        "404": sum(1 for entry in log if entry[4] == 404),
    }


def unexpected_errors(log: str) -> list[str]:
    """ERROR/CRITICAL lines of the worker log, but not a dead-lettered task's FAILURE."""
    return [
        line
        for line in log.splitlines()
        if ("ERROR/" in line or "CRITICAL/" in line) and "DeadLettered" not in line
    ]


def unfinished(client: redis.Redis, limit: int = 10) -> list[str]:
    lines = []
    for rid, due in client.zrange(keys.SCHEDULE, 0, limit - 1, withscores=True):
        info = client.hmget(keys.result(rid), "brand", "receipt_id", "attempts", "last_error")
        brand, receipt_id, attempts, error = info
        wait = due - time.time()
        lines.append(
            f"{rid}: {brand}:{receipt_id} attempts {attempts or 0}, next in {wait:.1f}s, "
            f"last error: {error or '-'}"
        )
    return lines


# --- output ----------------------------------------------------------------------------------


def say(text: str = "", err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def warn(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def run_cli(env: dict[str, str], *args: str) -> str:
    """`fiscal-worker ARGS` as a subprocess, against the demo's Redis; its output."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CLI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"(fiscal-worker {' '.join(args)} did not answer in {CLI_TIMEOUT:.0f} s)"
    output = done.stdout
    if done.returncode != 0:
        output += f"(exit {done.returncode}) {done.stderr.strip()}"
    return output


def print_summary(
    snap: Snapshot, plan: Plan, stats: dict[str, Any], check: OnceCheck, elapsed: float
) -> None:
    calls = api_calls(stats)
    dead = {
        r: snap.get(f"dead_lettered:{r}")
        for r in REASONS
        if r in EXPECTED_REASONS or snap.get(f"dead_lettered:{r}")
    }
    planned = plan.expected
    say()
    say("summary")
    rows = [
        ("results sent", len(plan.sends), f"{plan.valid_sends} valid, {MALFORMED} malformed"),
        ("received by the worker", snap.get("received"), "valid stream entries"),
        ("fiscalised (PATCHed)", snap.get("fiscalised"), f"planned {planned['fiscalised']}"),
        (
            "already fiscalised (no PATCH)",
            snap.get("already_done"),
            f"planned {planned['already_done']}",
        ),
        ("duplicates absorbed", snap.get("duplicate"), f"planned {planned['duplicate']}"),
        ("dead-lettered", snap.dead_lettered, ""),
    ]
    rows += [
        (f"  {reason}", count, f"planned {planned[f'dead_lettered:{reason}']}")
        for reason, count in dead.items()
    ]
    waits = "not ready, 5xx, busy receipt, rate budget"
    rows.append(("retries scheduled", snap.get("retries_scheduled"), waits))
    for label, value, note in rows:
        say(f"  {label:<31} {value:>5}  {note}".rstrip())
    say(
        f"  {'API calls (fake Clopos)':<31} auth {calls['auth']}, GET {calls['GET']}, "
        f"PATCH {calls['PATCH']}; answered 404 {calls['404']}, 429 {calls['429']}, "
        f"5xx {calls['5xx']}"
    )
    say(f"  {'elapsed':<31} {elapsed:5.1f}s")
    if check.ok:
        say("  exactly-once check: OK")
        say(
            f"    {check.receipts_patched} receipts PATCHed, none twice, none overwritten, "
            f"at most {check.max_concurrent} PATCH in flight per receipt"
        )
    else:
        say(f"  exactly-once check: FAILED ({len(check.problems)} problems)")
        for problem in check.problems[:10]:
            say(f"    {problem}")


def print_dlq(env: dict[str, str], client: redis.Redis, plan: Plan) -> None:
    say()
    say("the dead-letter store, through the CLI")
    say("  $ fiscal-worker dlq stats")
    say(indent(run_cli(env, "dlq", "stats")))
    say("  $ fiscal-worker dlq list --limit 10")
    say(indent(run_cli(env, "dlq", "list", "--limit", "10")))
    store = DeadLetterStore(client)
    entry = next(iter(store.list(reason="receipt_not_found", limit=1)), None)
    entry = entry or next(iter(store.list(limit=1)), None)
    entry_id = entry["id"] if entry else "dl-1"
    receipt_id = min(
        (rid for (brand, rid) in plan.final_fiscal_ids if brand == "openapitest"), default=1001
    )
    say()
    say("inspect a dead-letter store yourself (with FISCAL_REDIS_URL set to your deployment's):")
    say("  fiscal-worker dlq list --reason receipt_not_found")
    say(f"  fiscal-worker dlq show {entry_id}")
    say(f"  fiscal-worker dlq replay {entry_id}")
    say(f"  fiscal-worker receipt openapitest {receipt_id}")
