"""`fiscal-worker upgrade-keys`: move a Redis written by an older version to today's key
layout (worker/upgrade.py), with every worker stopped."""

from __future__ import annotations

import time

import click

from worker import keys
from worker.cli._root import _clean, _fail, _print_json, _redis, _settings, cli, json_option
from worker.upgrade import fold_receipts, migrate_keys


@cli.command("upgrade-keys")
@click.option("--dry-run", is_flag=True, help="Count what would be renamed; change nothing.")
@json_option
def upgrade_keys(dry_run: bool, as_json: bool) -> None:
    """Rename the per-brand keys of an older version (markers, audit trail, circuits, rate
    budget, tokens, locks) to the current layout, and fold each receipt's three legacy
    keys into its one-key record. Stop every worker first."""
    settings = _settings()
    redis_client = _redis()
    alive = int(
        redis_client.zcount(keys.WORKERS, time.time() - settings.worker_lease_seconds, "+inf")
    )
    if alive and not dry_run:
        _fail(
            f"{alive} worker process(es) sent a heartbeat within the last "
            f"{settings.worker_lease_seconds:g} s: stop every worker first (an old and a new "
            "worker would take different receipt locks)"
        )
    done = migrate_keys(redis_client, dry_run=dry_run)
    fold_receipts(
        redis_client, max_attempts=settings.audit_max_attempts, dry_run=dry_run, done=done
    )
    if as_json:
        _print_json(
            {
                "dry_run": dry_run,
                "renamed": done.renamed,
                "kept": done.kept,
                "unknown": done.unknown,
                "folded": done.folded,
            }
        )
        return
    verb = "would rename" if dry_run else "renamed"
    by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(done.renamed.items())) or "nothing"
    click.echo(f"{verb} {done.count()} keys: {by_kind}")
    folded = "would fold" if dry_run else "folded"
    click.echo(f"{folded} the legacy keys of {done.folded} receipts into one record each")
    for old in done.kept:
        click.echo(f"kept (its new name exists already): {_clean(old)}")
    for old in done.unknown:
        click.echo(f"left alone (not a key of the old layout): {_clean(old)}")
