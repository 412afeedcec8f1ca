"""`fiscal-worker`: the operator's command line (contract §5).

Exit status: 0 success, 1 failure (one line on stderr, never a traceback), 2 usage error.
Every Redis client comes from `worker.redis_conn.redis_client` (tests swap that one
function). Output never holds settings or secrets; hostile strings from dead-lettered
messages are escaped before they reach a terminal.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import click
import redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker import redis_conn
from worker.audit import AuditTrail
from worker.dlq import REASONS, DeadLetterStore, ReplayError
from worker.ingest_format import InvalidMessage, submit
from worker.settings import BRAND_PATTERN, Settings, SettingsError, get_settings

ERROR_COLUMN_CHARS = 60  # `dlq list` shortens errors to this
WIDE_OUTPUT_COLUMNS = 200  # table width when stdout is not a terminal (pipes, files)

# Characters JSON may carry raw but a terminal would act on (C1 controls, surrogates).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


# --- plumbing --------------------------------------------------------------------------


class _Group(click.Group):
    """Turns expected failures anywhere below into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            _fail(str(exc))
        except redis_conn.RedisUnavailable as exc:
            _fail(str(exc))
        except redis.exceptions.RedisError as exc:
            _fail(_describe_redis_error(exc))


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _describe_redis_error(exc: redis.exceptions.RedisError) -> str:
    try:
        settings = get_settings()
    except SettingsError:
        return f"Redis error ({exc.__class__.__name__})"
    return redis_conn.describe_redis_error(exc, settings)


def _settings() -> Settings:
    return get_settings()


def _redis() -> redis.Redis:
    return redis_conn.redis_client(_settings())


def _store() -> DeadLetterStore:
    settings = _settings()
    return DeadLetterStore(
        _redis(), warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
    )


def _stdin_is_interactive() -> bool:
    return sys.stdin.isatty()


def _print_json(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False, indent=2)
    click.echo(_UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def _console() -> Console:
    return Console(
        width=None if sys.stdout.isatty() else WIDE_OUTPUT_COLUMNS,
        highlight=False,
        soft_wrap=False,
    )


def _clean(value: Any) -> str:
    """A value fit for a terminal: None as '-', control/format characters escaped."""
    if value is None:
        return "-"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, width: int) -> str:
    text = " ".join(_clean(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(value: Any, width: int | None = None) -> Text:
    return Text(_clean(value) if width is None else _short(value, width))


def _check_brand(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and value != "" and not BRAND_PATTERN.fullmatch(value):
        raise click.BadParameter("must be 1-64 characters of A-Za-z0-9_.-")
    return value


def _check_receipt_brand(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not BRAND_PATTERN.fullmatch(value):
        raise click.BadParameter("must be 1-64 characters of A-Za-z0-9_.-")
    return value


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
reason_option = click.option(
    "--reason", type=click.Choice(REASONS), help="Only entries with this reason."
)
brand_option = click.option(
    "--brand",
    callback=_check_brand,
    help="Only entries of this brand ('' = messages whose brand was unreadable).",
)


# --- the group -------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """fiscal-worker: applies fiscal-device results to Clopos receipts.

    Settings come from FISCAL_* environment variables (FISCAL_REDIS_URL first of all).
    """


@cli.group(cls=_Group)
def dlq() -> None:
    """Inspect, replay and purge dead-lettered results."""


@dlq.command("list")
@reason_option
@brand_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Show at most N entries.",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Skip the N newest first.",
)
@json_option
def dlq_list(reason: str | None, brand: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List dead-lettered results, newest first."""
    entries = _store().list(reason=reason, brand=brand, limit=limit, offset=offset)
    if as_json:
        _print_json(entries)
        return
    if not entries:
        click.echo("no dead-lettered results")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "reason", "brand", "receipt_id", "fiscal_id", "attempts"):
        table.add_column(column, no_wrap=True)
    table.add_column("last_seen", no_wrap=True)
    table.add_column("http", no_wrap=True)
    table.add_column("error", no_wrap=True)
    for entry in entries:
        table.add_row(
            _cell(entry.get("id")),
            _cell(entry.get("reason")),
            _cell(entry.get("brand"), 32),
            _cell(entry.get("receipt_id")),
            _cell(entry.get("fiscal_id"), 32),
            _cell(entry.get("attempts")),
            _cell(entry.get("last_seen")),
            _cell(entry.get("http_status")),
            _cell(entry.get("error"), ERROR_COLUMN_CHARS),
        )
    _console().print(table)


@dlq.command("show")
@click.argument("entry_id", metavar="ID")
@json_option
def dlq_show(entry_id: str, as_json: bool) -> None:
    """Show one entry in full, payload included."""
    entry = _store().get(entry_id)
    if entry is None:
        _fail(f"no dead-letter entry {_short(entry_id, 80)}")
    if as_json:
        _print_json(entry)
        return
    for name, value in entry.items():
        if name in ("payload", "result"):
            continue
        click.echo(f"{name + ':':<18} {_clean(value)}")
    if entry.get("result") is not None:
        click.echo(f"{'result:':<18} {_clean(json.dumps(entry['result'], ensure_ascii=False))}")
    click.echo("payload:")
    click.echo(_clean(entry.get("payload")))


@dlq.command("stats")
@json_option
def dlq_stats(as_json: bool) -> None:
    """Counts by reason and by brand, and the store's size against its warning bound."""
    stats = _store().stats()
    if as_json:
        _print_json(stats)
        return
    click.echo(f"total:   {stats['total']} (warns at {stats['warn_entries']})")
    click.echo(
        f"bytes:   {stats['bytes']} = {_size(stats['bytes'])} "
        f"(warns at {_size(stats['warn_bytes'])})"
    )
    if stats["over_bound"]:
        click.echo(
            "WARNING: the dead-letter store is over its bound; nothing is dropped: "
            "replay or purge entries (fiscal-worker dlq replay / purge)"
        )
    for title, counts in (("reason", stats["by_reason"]), ("brand", stats["by_brand"])):
        if not counts:
            continue
        table = Table(box=None, pad_edge=False)
        table.add_column(title, no_wrap=True)
        table.add_column("count", justify="right", no_wrap=True)
        for name, count in counts.items():
            table.add_row(_cell(name if name else "(unknown)"), str(count))
        click.echo("")
        _console().print(table)


def _size(count: int) -> str:
    """Bytes for a human: 512 B, 1.5 KiB, 3.0 GiB."""
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _selection(
    entry_id: str | None, select_all: bool, reason: str | None, brand: str | None
) -> None:
    """Exactly one of: an ID, --all, or --reason/--brand (which may be combined)."""
    filtered = reason is not None or brand is not None
    chosen = sum((entry_id is not None, select_all, filtered))
    if chosen != 1:
        raise click.UsageError("give exactly one of: ID, --all, --reason/--brand")


@dlq.command("replay")
@click.argument("entry_id", metavar="[ID]", required=False)
@click.option("--all", "select_all", is_flag=True, help="Replay every entry.")
@reason_option
@brand_option
@json_option
def dlq_replay(
    entry_id: str | None, select_all: bool, reason: str | None, brand: str | None, as_json: bool
) -> None:
    """Put results back through the normal path and remove them from the store.

    Entries whose payload was truncated, or is not valid, are refused and stay.
    """
    _selection(entry_id, select_all, reason, brand)
    store = _store()
    stream = _settings().ingest_stream
    replayed: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    if entry_id is not None:
        if store.get(entry_id) is None:
            _fail(f"no dead-letter entry {_short(entry_id, 80)}")
        candidates: Any = [entry_id]
    else:
        candidates = store.ids(reason=reason, brand=brand)
    for candidate in candidates:
        try:
            stream_id = store.replay(candidate, stream=stream)
        except ReplayError as exc:
            refused.append({"id": candidate, "error": str(exc)})
            continue
        if stream_id is not None:  # None: removed meanwhile by someone else
            replayed.append({"id": candidate, "stream_id": stream_id})
    if as_json:
        _print_json({"replayed": replayed, "refused": refused})
    else:
        for item in replayed:
            click.echo(f"replayed {item['id']} as stream entry {item['stream_id']}")
        for item in refused:
            click.echo(f"refused {_clean(item['error'])}")
        click.echo(f"{len(replayed)} replayed, {len(refused)} refused")
    if entry_id is not None and refused:
        sys.exit(1)


@dlq.command("purge")
@click.argument("entry_id", metavar="[ID]", required=False)
@click.option("--all", "select_all", is_flag=True, help="Purge every entry.")
@reason_option
@brand_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def dlq_purge(
    entry_id: str | None,
    select_all: bool,
    reason: str | None,
    brand: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete entries for good. Bulk purges ask first unless --yes."""
    _selection(entry_id, select_all, reason, brand)
    store = _store()
    if entry_id is not None:
        if store.remove(entry_id) is None:
            _fail(f"no dead-letter entry {_short(entry_id, 80)}")
        purged = 1
    else:
        pending = store.count(reason=reason, brand=brand)
        if pending and not yes:
            if not _stdin_is_interactive():
                _fail(f"refusing to purge {pending} entries without confirmation; pass --yes")
            if not click.confirm(f"Purge {pending} entries?", default=False, err=True):
                _fail("not confirmed; nothing purged")
        purged = store.purge(reason=reason, brand=brand) if pending else 0
    if as_json:
        _print_json({"purged": purged})
    else:
        click.echo(f"purged {purged} entr{'y' if purged == 1 else 'ies'}")


# --- receipts --------------------------------------------------------------------------


@cli.command("receipt")
@click.argument("brand", callback=_check_receipt_brand)
@click.argument("receipt_id", type=click.IntRange(min=1))
@json_option
def receipt(brand: str, receipt_id: int, as_json: bool) -> None:
    """The worker's record of one receipt: state, fiscal_id, attempts."""
    settings = _settings()
    trail = AuditTrail(
        _redis(), ttl_seconds=settings.audit_ttl_seconds, max_attempts=settings.audit_max_attempts
    )
    record = trail.get(brand, receipt_id)
    if record is None:
        _fail(f"no record for brand {brand} receipt {receipt_id}")
    if as_json:
        _print_json(record)
        return
    for name in ("brand", "receipt_id", "state", "fiscal_id", "device_id", "result_id"):
        click.echo(f"{name + ':':<12} {_clean(record.get(name))}")
    for name in ("venue_id", "printed_at", "dlq_id"):
        if record.get(name) is not None:
            click.echo(f"{name + ':':<12} {_clean(record.get(name))}")
    click.echo(f"{'updated_at:':<12} {_clean(record.get('updated_at'))}")
    if record.get("extras"):
        click.echo(f"{'extras:':<12} {_clean(json.dumps(record['extras'], ensure_ascii=False))}")
    attempts = record.get("attempts") or []
    if not attempts:
        click.echo("attempts:    none")
        return
    table = Table(box=None, pad_edge=False, title="attempts", title_justify="left")
    for column in ("at", "call", "http", "outcome"):
        table.add_column(column, no_wrap=True)
    for attempt in attempts:
        table.add_row(
            _cell(attempt.get("at")),
            _cell(attempt.get("call")),
            _cell(attempt.get("http_status")),
            _cell(attempt.get("outcome"), 80),
        )
    _console().print(table)


# --- submitting ------------------------------------------------------------------------


@cli.command("stats")
@json_option
def stats(as_json: bool) -> None:
    """The deployment now: results in flight, counters, dead letters, and per brand the rate
    budget and the circuit breaker."""
    from worker.status import collect

    state = collect(_redis(), _settings())
    if as_json:
        _print_json(state)
        return
    console = _console()
    results = state["results"]
    console.print(
        f"results: {results['unfinished']} unfinished, {results['due']} due, "
        f"{results['celery_queue']} in the Celery queue; stream: {results['stream_length']} "
        f"entries, {results['stream_pending']} read and not settled"
    )
    counters = state["counters"]
    if counters:
        console.print(
            "counters: " + ", ".join(f"{_clean(k)} {v}" for k, v in sorted(counters.items()))
        )
    dead = state["dead_letters"]
    console.print(
        f"dead letters: {dead.get('total', 0)} ({dead.get('bytes', 0)} bytes)"
        + (
            "  WARNING: over the store's bound (nothing is dropped)"
            if dead.get("over_bound")
            else ""
        )
    )
    memory = state["redis"]
    console.print(
        f"redis: maxmemory-policy {memory['maxmemory_policy'] or 'unknown'}, used "
        f"{memory['used_memory']} bytes of {memory['maxmemory'] or 'no limit'}; "
        f"workers alive: {state['workers']}"
    )
    if memory["evicting"]:
        console.print(
            "WARNING: an evicting maxmemory-policy can delete unfinished results; "
            "set it to noeviction"
        )
    table = Table(box=None, pad_edge=False)
    for column in (
        "brand",
        "circuit",
        "failures",
        "calls/window",
        "others",
        "backlog s",
        "paused s",
    ):
        table.add_column(column)
    for brand, info in state["brands"].items():
        budget, breaker = info["budget"], info["breaker"]
        circuit = str(breaker["state"])
        if breaker.get("opens_again_in_seconds"):
            circuit += f" ({breaker['opens_again_in_seconds']:.0f}s)"
        table.add_row(
            _cell(brand),
            _cell(circuit),
            _cell(breaker.get("failures", 0)),
            _cell(f"{budget['calls_in_window']}/{budget['limit']}"),
            _cell(budget["others_estimate"]),
            _cell(budget["backlog_seconds"]),
            _cell(budget["paused_for_seconds"] or "-"),
        )
    if state["brands"]:
        console.print(table)


@cli.command("metrics")
@click.option(
    "--serve",
    "port",
    type=click.IntRange(1, 65535),
    help="Serve /metrics on this port until stopped, instead of printing once.",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Interface for --serve.")  # noqa: S104
def metrics(port: int | None, host: str) -> None:
    """Prometheus metrics of the deployment (read from Redis; one exporter is enough)."""
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server

    from worker.metrics import RedisStateCollector

    registry = CollectorRegistry()
    registry.register(RedisStateCollector(_redis(), _settings()))
    if port is None:
        click.echo(generate_latest(registry).decode(), nl=False)
        return
    server, thread = start_http_server(port, addr=host, registry=registry)
    click.echo(f"serving metrics on http://{host}:{port}/metrics")
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


@cli.command("submit")
@click.option("--brand", required=True, help="The Clopos brand (1-64 chars of A-Za-z0-9_.-).")
@click.option("--receipt-id", type=int, required=True, help="The Clopos receipt id.")
@click.option("--fiscal-id", required=True, help="The fiscal id the device printed.")
@click.option("--venue-id", type=int, help="The receipt's venue, if not the brand's default.")
@click.option("--device-id", help="The fiscal device, for the audit trail.")
@click.option("--result-id", help="Your unique id for this result.")
@click.option("--printed-at", help="When the device printed, RFC 3339 (2024-05-01T12:30:00Z).")
@json_option
def submit_command(
    brand: str,
    receipt_id: int,
    fiscal_id: str,
    venue_id: int | None,
    device_id: str | None,
    result_id: str | None,
    printed_at: str | None,
    as_json: bool,
) -> None:
    """Hand one fiscal result to the worker (appends to the ingest stream)."""
    stream = _settings().ingest_stream
    try:
        entry_id = submit(
            _redis(),
            brand=brand,
            receipt_id=receipt_id,
            fiscal_id=fiscal_id,
            venue_id=venue_id,
            device_id=device_id,
            printed_at=printed_at,
            result_id=result_id,
            stream=stream,
        )
    except InvalidMessage as exc:
        _fail(_clean(str(exc)), code=2)
    if as_json:
        _print_json({"stream": stream, "id": entry_id})
    else:
        click.echo(entry_id)


# --- commands implemented elsewhere ----------------------------------------------------


@cli.command("fake-clopos")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--seed",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON file of brands and receipts to start with.",
)
@click.option("--token-lifetime", type=click.FloatRange(min=0), help="Token lifetime, seconds.")
@click.option("--rate-limit", type=click.IntRange(min=1), help="Requests per window per brand.")
@click.option("--rate-window", type=click.FloatRange(min=0), help="Rate window, seconds.")
@click.option("--latency", type=click.FloatRange(min=0), help="Added delay per call, seconds.")
def fake_clopos(
    host: str,
    port: int,
    seed: str | None,
    token_lifetime: float | None,
    rate_limit: int | None,
    rate_window: float | None,
    latency: float | None,
) -> None:
    """Run a fake Clopos API (for the demo and tests)."""
    try:
        from worker.fake_clopos import serve
    except ModuleNotFoundError as exc:
        if exc.name != "worker.fake_clopos":
            raise
        _fail("worker.fake_clopos is not installed in this build")
    options = {
        "token_lifetime": token_lifetime,
        "rate_limit": rate_limit,
        "rate_window": rate_window,
        "latency": latency,
    }
    serve(host, port, seed, **{name: value for name, value in options.items() if value is not None})


@cli.command("demo")
@click.option(
    "--keep",
    is_flag=True,
    help="After the summary, keep Redis, the fake API and the worker running until Enter.",
)
@click.option(
    "--redis",
    "redis_mode",
    type=click.Choice(["auto", "redis-server", "fakeredis"]),
    default="auto",
    show_default=True,
    help="Embedded Redis: a private redis-server if installed (auto), or fakeredis.",
)
@click.option(
    "--results",
    type=click.IntRange(min=50, max=1000),
    default=200,
    show_default=True,
    help="How many stream entries the simulated adapter sends.",
)
def demo(keep: bool, redis_mode: str, results: int) -> None:
    """Run the whole system on this machine against a fake Clopos API (< 60 s)."""
    try:
        from worker.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "worker.demo":
            raise
        _fail("worker.demo is not installed in this build")
    sys.exit(run_demo(keep=keep, redis=redis_mode, results=results))


def main() -> None:
    """Console-script entry point (`fiscal-worker`)."""
    cli(prog_name="fiscal-worker")


if __name__ == "__main__":
    main()
