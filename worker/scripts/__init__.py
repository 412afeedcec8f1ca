"""The Lua scripts, one file per script: `load(name)` gives a script's text.

Files are named `<module>_<verb>.lua` after the module that runs them (`store_admit.lua`
is ResultStore's admission). Each starts with a header comment: what it does, its KEYS,
its ARGV and what it returns. A script gets every key it touches through KEYS; the key
names are built in worker/keys.py.

Shared code lives in fragments, `<module>_<name>_fn.lua`: they define local functions and
are never run alone. A script takes one in with a line of its own,

    -- #include ratelimit_reserve_fn.lua

which `load` replaces with that file's text (its own includes expanded first). Each file
is included at most once per script, so two fragments may both include a third; an include
cycle is an error. That is the whole mechanism: no other line is rewritten.

    redis_client.register_script(scripts.load("store_admit"))

On a pipeline a script goes as EVAL with its text (`queue`): redis-py would send SCRIPT
EXISTS before every pipeline holding a registered script (a round trip), and an EVALSHA
meeting NOSCRIPT inside MULTI would fail alone while the rest of the transaction ran.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.client import Pipeline
from redis.commands.core import Script

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_INCLUDE = re.compile(r"^-- #include (\S+)[ \t]*$", re.MULTILINE)


@cache
def load(name: str) -> str:
    """The text of `<name>.lua`, its `-- #include` lines expanded (read once, cached)."""
    return _expand(name, set(), ())


def queue(pipe: Pipeline, script: Script, *, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue `script` on `pipe` as EVAL with its text (comment lines left out): no SCRIPT
    EXISTS before the pipeline, no NOSCRIPT inside a transaction (Redis caches the compiled
    script by its text's SHA)."""
    pipe.execute_command("EVAL", compact(script.script), len(keys), *keys, *args)


@cache
def compact(text: str | bytes) -> str:
    """A script's text without its comment-only and blank lines (what EVAL sends)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    lines = (
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("--")
    )
    return "\n".join(lines) + "\n"


def names() -> list[str]:
    """Every script and fragment in the package (file names without `.lua`), sorted."""
    files = resources.files(__package__).iterdir()
    return sorted(f.name.removesuffix(".lua") for f in files if f.name.endswith(".lua"))


def source(name: str) -> str:
    """The text of `<name>.lua` as it is in the file (includes not expanded)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a script name: {name!r}")
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _expand(name: str, included: set[str], stack: tuple[str, ...]) -> str:
    included.add(name)

    def include(match: re.Match[str]) -> str:
        file = match.group(1)
        inner = file.removesuffix(".lua")
        if not file.endswith(".lua") or not _NAME.fullmatch(inner):
            raise ValueError(f"{name}.lua: bad include {file!r}")
        if inner == name or inner in stack:
            raise ValueError(f"{name}.lua: include cycle through {file}")
        if inner in included:
            return f"-- ({file}: included above)"
        return _expand(inner, included, (*stack, name)).rstrip("\n")

    return _INCLUDE.sub(include, source(name))
