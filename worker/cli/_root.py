"""The root group and what every command shares: error handling, settings and Redis, output.

Expected failures anywhere below the root group (a settings error, Redis unreachable or
failing) become one line on stderr and exit 1, never a traceback. Every Redis client comes
from `worker.redis_conn.redis_client` (tests swap that one function). Output never holds
settings or secrets; hostile strings from dead-lettered messages are escaped before they
reach a terminal.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import click
import redis
from rich.console import Console
from rich.text import Text

from worker import redis_conn
from worker.settings import Settings, SettingsError, get_settings

WIDE_OUTPUT_COLUMNS = 200  # table width when stdout is not a terminal (pipes, files)

# Characters JSON may carry raw but a terminal would act on (C1 controls, surrogates).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


# --- errors ----------------------------------------------------------------------------


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


# --- settings and Redis ----------------------------------------------------------------


def _settings() -> Settings:
    return get_settings()


def _redis() -> redis.Redis:
    return redis_conn.redis_client(_settings())


# --- output ----------------------------------------------------------------------------


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


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


# --- the group -------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """fiscal-worker: applies fiscal-device results to Clopos receipts.

    Settings come from FISCAL_* environment variables (FISCAL_REDIS_URL first of all).
    """
