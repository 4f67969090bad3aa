from __future__ import annotations

from collections.abc import Iterator

import pytest

from .clock import Clock
from .redis_store import Store, free_port


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store() -> Iterator[Store]:
    """A real redis-server of the test's own, on a free loopback port, persistence off."""
    running = Store(free_port())
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def clock() -> Clock:
    """A clock at 1000 s that moves only when the test moves it."""
    return Clock()
