"""The unit tests' shared fixtures: a fresh fakeredis (with Lua) and a clock moved by hand."""

from __future__ import annotations

import fakeredis
import pytest
from support import Clock


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()
