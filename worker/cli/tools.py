"""Development tools: `fiscal-worker fake-clopos` and `fiscal-worker demo`.

Both are implemented elsewhere (`worker.fake_clopos`, `worker.demo`) and imported only when
run: they need the `[demo]` extra (starlette, uvicorn, fakeredis), which a production install
may leave out. Without it they fail with one line on stderr and exit 1, like every other
expected failure of the command line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from worker.cli._root import _fail, cli

# The top-level packages of the [demo] extra.
DEMO_EXTRA_PACKAGES = ("starlette", "uvicorn", "fakeredis")


@contextlib.contextmanager
def _needs_demo_extra(what: str, module: str) -> Iterator[None]:
    """A missing package of the [demo] extra, or `module` (the tool) missing from this build,
    becomes one line on stderr and exit 1.

    Any other missing module is a bug, not an install choice: it is raised as it is.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name == module:
            _fail(f"{module} is not installed in this build")
        if (exc.name or "").partition(".")[0] not in DEMO_EXTRA_PACKAGES:
            raise
        _fail(
            f"{what} needs the [demo] extra ({', '.join(DEMO_EXTRA_PACKAGES)}): "
            "pip install 'fiscal-worker[demo]'"
        )


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
    with _needs_demo_extra("fake-clopos", "worker.fake_clopos"):
        from worker.fake_clopos import serve

        options = {
            "token_lifetime": token_lifetime,
            "rate_limit": rate_limit,
            "rate_window": rate_window,
            "latency": latency,
        }
        serve(
            host,
            port,
            seed,
            **{name: value for name, value in options.items() if value is not None},
        )


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
    with _needs_demo_extra("the demo", "worker.demo"):
        from worker.demo import run_demo

        code = run_demo(keep=keep, redis=redis_mode, results=results)
    sys.exit(code)
