"""`fiscal-worker stats` and `fiscal-worker metrics`: the state of the whole deployment."""

from __future__ import annotations

import click
from rich.table import Table

from worker.cli._root import (
    _cell,
    _clean,
    _console,
    _print_json,
    _redis,
    _settings,
    cli,
    json_option,
)


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
        f"{results['celery_queue']} in the Celery queue (oldest due for "
        f"{results['oldest_due_seconds']:.0f}s); stream: {results['stream_length']} entries, "
        f"{results['stream_pending']} read and not settled (oldest "
        f"{results['ingest_lag_seconds']:.0f}s)"
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
