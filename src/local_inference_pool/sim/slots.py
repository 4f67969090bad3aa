"""The simulator's slots and loaded models: at most ``slots`` requests run at once, the rest wait
inside the server (as llama-server queues them), and a request for a model not loaded waits for its
load (``load_seconds``), the least recently used model going out past ``max_loaded_models``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

__all__ = ["Slots", "Stats"]


@dataclass
class Stats:
    running: int = 0
    peak: int = 0
    deferred: int = 0
    peak_in_flight: int = 0  # the most requests it had at once, running or waiting for a slot
    requests: int = 0
    completed: int = 0
    abandoned: int = 0  # non-streaming requests stopped because their client disconnected
    model_loads: int = 0
    seen_headers: list[dict[str, str]] = field(default_factory=list)


class Slots:
    def __init__(
        self, stats: Stats, *, slots: int, first_model: str, load_seconds: float, max_loaded: int
    ) -> None:
        self.stats = stats
        self.loaded: list[str] = [first_model]  # most recently used first
        self._count = slots
        self._load_seconds = load_seconds
        self._max_loaded = max_loaded
        # Made on first use, inside the event loop that serves (the app may be built outside it).
        self._free: anyio.Semaphore | None = None
        self._load_lock: anyio.Lock | None = None

    @asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold one slot, with ``model`` loaded, for the body of the ``async with``."""
        if self._free is None:
            self._free = anyio.Semaphore(self._count)
            self._load_lock = anyio.Lock()
        stats = self.stats
        stats.deferred += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.deferred + stats.running)
        try:
            await self._free.acquire()
        finally:
            stats.deferred -= 1
        try:
            await self._ensure_loaded(model)
            stats.running += 1
            stats.peak = max(stats.peak, stats.running)
            try:
                yield
            finally:
                stats.running -= 1
        finally:
            self._free.release()

    async def _ensure_loaded(self, model: str) -> None:
        if model in self.loaded:
            self.loaded.remove(model)
            self.loaded.insert(0, model)
            return
        assert self._load_lock is not None
        async with self._load_lock:
            if model not in self.loaded:
                await anyio.sleep(self._load_seconds)
                self.loaded.insert(0, model)
                del self.loaded[self._max_loaded :]
                self.stats.model_loads += 1
