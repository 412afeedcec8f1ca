"""`fiscal-worker submit`: hand one fiscal result to the worker, as an adapter would."""

from __future__ import annotations

import click

from worker.cli._root import _clean, _fail, _print_json, _redis, _settings, cli, json_option
from worker.ingest_format import InvalidMessage, submit


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
