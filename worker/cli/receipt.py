"""`fiscal-worker receipt BRAND RECEIPT_ID`: the worker's record of one receipt."""

from __future__ import annotations

import json

import click
from rich.table import Table

from worker.audit import AuditTrail
from worker.cli._root import (
    _cell,
    _clean,
    _console,
    _fail,
    _print_json,
    _redis,
    _settings,
    cli,
    json_option,
)
from worker.ingest_format import BRAND_PATTERN


def _check_receipt_brand(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not BRAND_PATTERN.fullmatch(value):
        raise click.BadParameter("must be 1-64 characters of A-Za-z0-9_.-")
    return value


@cli.command("receipt")
@click.argument("brand", callback=_check_receipt_brand)
@click.argument("receipt_id", type=click.IntRange(min=1))
@json_option
def receipt(brand: str, receipt_id: int, as_json: bool) -> None:
    """The worker's record of one receipt: state, fiscal_id, attempts."""
    trail = AuditTrail.from_settings(_redis(), _settings())
    record = trail.get(brand, receipt_id)
    if record is None:
        _fail(
            f"no record for brand {brand} receipt {receipt_id}: never received, or older than "
            f"the audit window ({trail.window()}); the audit events keep every finished "
            "result for as long as your log store does"
        )
    if as_json:
        _print_json(record)
        return
    for name in ("brand", "receipt_id", "state", "fiscal_id", "device_id", "result_id"):
        click.echo(f"{name + ':':<12} {_clean(record.get(name))}")
    for name in ("venue_id", "printed_at", "dlq_id"):
        if record.get(name) is not None:
            click.echo(f"{name + ':':<12} {_clean(record.get(name))}")
    click.echo(f"{'updated_at:':<12} {_clean(record.get('updated_at'))}")
    expires = record.get("expires_in")
    if expires is not None:
        click.echo(f"{'kept:':<12} {_remaining(expires)} more (the audit window: {trail.window()})")
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


def _remaining(seconds: int) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"
