"""Development tools: `fiscal-worker fake-clopos`, `fiscal-worker demo` and
`fiscal-worker adapter-sim`.

They are implemented elsewhere (`worker.fake_clopos`, `worker.demo`) and imported only when
run: they need the `[demo]` extra (fakeredis), which a production install
may leave out. Without it they fail with one line on stderr and exit 1, like every other
expected failure of the command line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from worker.cli._root import _fail, _redis, _settings, cli

# The top-level packages of the [demo] extra.
DEMO_EXTRA_PACKAGES = ("fakeredis",)


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
@click.option(
    "--web",
    is_flag=True,
    help="After the summary, also start the web console on this demo (a one-time "
    "password is printed) and keep everything running until Enter.",
)
def demo(keep: bool, redis_mode: str, results: int, web: bool) -> None:
    """Run the whole system on this machine against a fake Clopos API (< 60 s)."""
    with _needs_demo_extra("the demo", "worker.demo"):
        from worker.demo import run_demo

        code = run_demo(keep=keep, redis=redis_mode, results=results, web=web)
    sys.exit(code)


@cli.command("adapter-sim")
@click.option(
    "--brand",
    "brands",
    multiple=True,
    default=("openapitest",),
    show_default=True,
    help="Brand to send results for; repeat for several (taken in turn).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1, max=50),
    default=1.0,
    show_default=True,
    help="Results per second.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Stop after this many results (default: run until SIGTERM or Ctrl-C).",
)
@click.option(
    "--fake-clopos",
    "fake_url",
    metavar="URL",
    help="A fake Clopos API (fiscal-worker fake-clopos): create each closed receipt there first.",
)
@click.option(
    "--start-id",
    type=click.IntRange(min=1),
    help="First receipt id (default: from the clock, so a restart never reuses one).",
)
def adapter_sim(
    brands: tuple[str, ...],
    rate: float,
    count: int | None,
    fake_url: str | None,
    start_id: int | None,
) -> None:
    """Keep sending results to the ingest stream, as an adapter would (the compose demo)."""
    with _needs_demo_extra("adapter-sim", "worker.demo.adapter"):
        from worker.demo.adapter import AdapterSim, SimConfig, fake_client, run_until_signalled
    from worker.ingest_format import BRAND_PATTERN
    from worker.logs import configure_logging

    for brand in brands:
        if not BRAND_PATTERN.fullmatch(brand):
            _fail(f"--brand {brand[:70]!r}: must be 1-64 characters of A-Za-z0-9_.-", code=2)
    settings = _settings()
    configure_logging(settings.log_level)
    config = SimConfig(
        brands=brands, rate=rate, count=count, start_id=start_id, stream=settings.ingest_stream
    )
    fake = fake_client(fake_url) if fake_url else None
    try:
        sim = AdapterSim(_redis(), config, fake=fake)
        run_until_signalled(sim)
    finally:
        if fake is not None:
            fake.close()
    if sim.error:
        _fail(sim.error)
    click.echo(f"sent {sim.sent} results")
