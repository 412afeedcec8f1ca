"""The fault suite: real redis-server, real `celery worker` processes and the fake Clopos API
over HTTP, as in tests/integration (whose fixtures are reused here, not copied), plus a
ledger per case that is printed at the end of the run and must balance.

    .venv/bin/python -m pytest tests/faults -m faults     # the suite (~10 min on 2 cores)
    FISCAL_SOAK_SECONDS=600 ... -m soak                   # a longer compressed day
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults.ledger import Ledger

# The integration fixtures: a private redis-server (AOF, password), the fake API, the
# workers' environment and `start_worker`. Imported, so pytest registers them here too.
from integration.conftest import (  # noqa: F401
    env,
    fake,
    r,
    redis_server,
    start_worker,
)

REPORTS = pytest.StashKey[list[tuple[str, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    # --strict-markers is on: register the suite's markers unless pyproject.toml does.
    registered = {line.split(":")[0].strip() for line in config.getini("markers")}
    if "faults" not in registered:
        config.addinivalue_line("markers", "faults: fault suite (real processes, a ledger)")
    if "soak" not in registered:
        config.addinivalue_line("markers", "soak: the compressed production day")
    config.stash[REPORTS] = []


@pytest.fixture
def ledger(request: pytest.FixtureRequest, fake, r) -> Iterator[Ledger]:  # noqa: F811
    """The case's ledger; reported at the end of the session even if the case failed early."""
    book = Ledger(request.node.name, fake=fake, redis=r)
    yield book
    if not book.reported:
        try:
            book.compute(note="computed at teardown: the case stopped before its check")
        except Exception as exc:  # Redis may be the fault under test
            book.reported = True
            book.text = f"ledger {book.name}: could not be computed ({exc!r})"
    request.config.stash[REPORTS].append((request.node.nodeid, book.render()))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = config.stash.get(REPORTS, [])
    if not reports:
        return
    terminalreporter.section("fault suite ledgers")
    for _nodeid, text in reports:
        for line in text.splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
