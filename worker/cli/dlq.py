"""`fiscal-worker dlq`: list, show, stats, replay and purge dead-lettered results."""

from __future__ import annotations

import getpass
import json
import os
import sys
from typing import Any, NoReturn

import click
import redis
from rich.table import Table

from worker.cli._root import (
    _cell,
    _clean,
    _console,
    _describe_redis_error,
    _fail,
    _Group,
    _print_json,
    _redis,
    _settings,
    _short,
    cli,
    json_option,
)
from worker.dlq import REASONS, DeadLetterStore, Replayed
from worker.ingest_format import BRAND_PATTERN
from worker.oplog import OperatorLog

ERROR_COLUMN_CHARS = 60  # `dlq list` shortens errors to this


def _store() -> DeadLetterStore:
    settings = _settings()
    return DeadLetterStore(
        _redis(), warn_entries=settings.dlq_warn_entries, warn_bytes=settings.dlq_warn_bytes
    )


def _stdin_is_interactive() -> bool:
    return sys.stdin.isatty()


def _check_brand(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and value != "" and not BRAND_PATTERN.fullmatch(value):
        raise click.BadParameter("must be 1-64 characters of A-Za-z0-9_.-")
    return value


reason_option = click.option(
    "--reason", type=click.Choice(REASONS), help="Only entries with this reason."
)
brand_option = click.option(
    "--brand",
    callback=_check_brand,
    help="Only entries of this brand ('' = messages whose brand was unreadable).",
)


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
    if entry_id is not None:
        if store.get(entry_id) is None:
            _fail(f"no dead-letter entry {_short(entry_id, 80)}")
        candidates: Any = [entry_id]
    else:
        candidates = store.ids(reason=reason, brand=brand)
    outcome = Replayed([], [])
    failed: redis.exceptions.RedisError | None = None
    try:
        store.replay_many(candidates, stream=stream, into=outcome)
    except redis.exceptions.RedisError as exc:
        failed = exc
    # what was done is logged, even when Redis failed midway
    _log_action(
        "replay",
        _selected(entry_id, reason, brand),
        len(outcome.replayed),
        refused=len(outcome.refused),
        ids=[item["id"] for item in outcome.replayed],
    )
    replayed, refused = outcome
    if failed is not None:
        _stopped_by(
            failed,
            f"{len(replayed)} replayed and {len(refused)} refused before it failed",
            {"replayed": replayed, "refused": refused} if as_json else None,
        )
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
        _log_action("purge", _selected(entry_id, reason, brand), 1, ids=[entry_id])
    else:
        pending = store.count(reason=reason, brand=brand)
        if pending and not yes:
            if not _stdin_is_interactive():
                _fail(f"refusing to purge {pending} entries without confirmation; pass --yes")
            if not click.confirm(f"Purge {pending} entries?", default=False, err=True):
                _fail("not confirmed; nothing purged")
        removed: list[str] = []
        failed: redis.exceptions.RedisError | None = None
        try:
            if pending:
                store.remove_many(store.ids(reason=reason, brand=brand), into=removed)
        except redis.exceptions.RedisError as exc:
            failed = exc
        _log_action("purge", _selected(entry_id, reason, brand), len(removed), ids=removed)
        if failed is not None:
            _stopped_by(
                failed,
                f"{len(removed)} purged before it failed",
                {"purged": len(removed)} if as_json else None,
            )
        purged = len(removed)
    if as_json:
        _print_json({"purged": purged})
    else:
        click.echo(f"purged {purged} entr{'y' if purged == 1 else 'ies'}")


def _stopped_by(
    exc: redis.exceptions.RedisError, done: str, document: dict[str, Any] | None = None
) -> NoReturn:
    """A bulk action cut short by Redis: say what was done (it stays done: those entries
    are out of the store) and how to go on, on one line of stderr, exit 1; with --json,
    `document` (what was done) goes to stdout first, with the error in it."""
    message = f"{_describe_redis_error(exc)}; {done}. Run the same command again for the rest."
    if document is not None:
        _print_json({**document, "error": message})
    _fail(message)


def _selected(entry_id: str | None, reason: str | None, brand: str | None) -> dict[str, Any]:
    """What a replay or purge was asked for, as the operator log keeps it."""
    if entry_id is not None:
        return {"id": entry_id}
    return {name: value for name, value in (("reason", reason), ("brand", brand))
            if value is not None} or {"all": True}  # fmt: skip


def _log_action(
    action: str,
    selection: dict[str, Any],
    count: int,
    *,
    refused: int = 0,
    ids: list[str] | None = None,
) -> None:
    """Write the operator log; a Redis that refuses it is a warning (the action is done, and
    its `operator_action` log line was written first)."""
    try:
        OperatorLog(_redis()).record(
            who=_os_user(), via="cli", action=action, selection=selection, count=count,
            refused=refused, ids=ids,
        )  # fmt: skip
    except redis.exceptions.RedisError as exc:
        click.echo(
            f"warning: {action} of {count} not written to the operator log "
            f"({exc.__class__.__name__})",
            err=True,
        )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        return f"uid {os.getuid()}"


@dlq.command("log")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=10_000),
    default=50,
    show_default=True,
    help="Show the newest N entries.",
)
@json_option
def dlq_log(limit: int, as_json: bool) -> None:
    """The operator log: every replay and purge, from the console and the CLI."""
    entries = OperatorLog(_redis()).recent(limit)
    if as_json:
        _print_json(entries)
        return
    if not entries:
        click.echo("no operator actions logged")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("at", "who", "via", "action", "selection", "count", "refused"):
        table.add_column(column, no_wrap=True)
    for entry in entries:
        table.add_row(
            _cell(entry["at"]),
            _cell(entry["who"], 32),
            _cell(entry["via"]),
            _cell(entry["action"]),
            _cell(json.dumps(entry["selection"], sort_keys=True), 60),
            _cell(entry["count"]),
            _cell(entry["refused"]),
        )
    _console().print(table)
