"""Marks every test by the folder it lives in, so `-m` selects by kind:

    tests/unit         no mark: fakeredis, httpx.MockTransport, the test clock; seconds
    tests/integration  integration: a private redis-server, real celery worker processes,
                       the fake Clopos API over HTTP; minutes
    tests/faults       integration and faults: the fault suite, an injected fault per case

(`pytestmark` in a conftest.py marks nothing; this hook does.) `make test-fast` runs
`-m "not integration"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# No per-example time limit: a deadline is a timing assertion, and a busy CI machine fails
# it for reasons the test is not about (speed is measured by the benchmarks).
settings.register_profile("fiscal-worker", deadline=None)
settings.load_profile("fiscal-worker")

HERE = Path(__file__).resolve().parent
MARKS_BY_FOLDER = {
    "integration": ("integration",),
    "faults": ("integration", "faults"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(HERE).parts[0]
        except ValueError:  # a test outside tests/
            continue
        for name in MARKS_BY_FOLDER.get(folder, ()):
            item.add_marker(getattr(pytest.mark, name))
