"""The house plan, checked: who may import whom inside `worker/` (no back edges), and that
the core needs nothing of the `[demo]` extra. Read from the source (AST), so a lazy import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"
TOOLING = ("worker.cli", "worker.demo", "worker.fake_clopos", "worker.testing", "worker.web")
DEMO_EXTRA = ("fakeredis",)  # starlette and uvicorn: the console needs them too
# What the Clopos family may use: the vocabulary and the plumbing, never the pipeline.
CLOPOS_MAY_USE = ("worker.clopos", "worker.errors", "worker.logs", "worker.settings",
                  "worker.keys", "worker.scripts", "worker.ratelimit",
                  "worker.telemetry")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(WORKER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): imports(path) for path in sorted(WORKER.rglob("*.py"))}


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_layout_is_what_this_test_reads():
    assert {"worker.pipeline", "worker.clopos.client", "worker.cli", "worker.testing"} <= set(
        MODULES
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_in_worker_imports_the_tasks_package(module):
    assert not [name for name in MODULES[module] if within(name, ("tasks",))]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not within(m, TOOLING)))
def test_the_core_never_imports_the_tooling_or_the_demo_extra(module):
    bad = [n for n in MODULES[module] if within(n, TOOLING) or within(n, DEMO_EXTRA)]
    assert bad == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if within(m, ("worker.clopos",))))
def test_the_clopos_family_never_calls_back_into_the_pipeline(module):
    ours = [n for n in MODULES[module] if n.startswith("worker.")]  # `from worker import x`: x
    assert [n for n in ours if not within(n, CLOPOS_MAY_USE)] == []
