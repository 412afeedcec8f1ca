"""`fiscal-worker`: the operator's command line (its commands and output: docs/interface.md).

Exit status: 0 success, 1 failure (one line on stderr, never a traceback), 2 usage error.

`_root` holds the root group and what all commands share (error handling, Redis, output);
each other module adds one command group to it: `dlq`, `receipt`, `submit`, `status`
(stats, metrics), `upgrade` (upgrade-keys), `web` (the console, web-user) and `tools`
(fake-clopos, demo, adapter-sim: the development tools).
"""

from __future__ import annotations

# Imported for what they do: each one adds its commands to `cli`.
from worker.cli import dlq, receipt, status, submit, tools, upgrade, web  # noqa: F401
from worker.cli._root import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point (`fiscal-worker`)."""
    cli(prog_name="fiscal-worker")
