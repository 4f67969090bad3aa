"""Which backend stores each response the pool relayed (OpenAI's Responses API).

A backend may keep responses (LM Studio does; vLLM serves ``GET /v1/responses/{id}``), and a
``previous_response_id`` then works on that server only. The gateway remembers the backend of
every response id it relays for ``response_ttl`` seconds: here, at most ``response_max_ids`` (the
oldest go first), and fleet-wide through the pool's shared store when there is one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from local_inference_pool.config import PoolConfig
from local_inference_pool.pool import Pool

__all__ = ["ResponseMemory"]


class ResponseMemory:
    def __init__(
        self, config: PoolConfig, pool: Pool, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = config.response_ttl
        self.max_ids = config.response_max_ids
        self._pool = pool
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> backend, expiry

    def __len__(self) -> int:
        return len(self._entries)

    async def remember(self, response_id: str, backend: str) -> None:
        entries = self._entries
        entries[response_id] = (backend, self._clock() + self.ttl)
        entries.move_to_end(response_id)
        while len(entries) > self.max_ids:
            entries.popitem(last=False)
        # Remembered here even when the store is away; other processes will not know it then.
        await self._pool.fleet.remember(f"response:{response_id}", backend, self.ttl)

    async def backend_of(self, response_id: str) -> str | None:
        """The backend that stores ``response_id``, if this pool (or its fleet) saw it made."""
        entry = self._entries.get(response_id)
        if entry is not None:
            if entry[1] > self._clock():
                return entry[0]
            del self._entries[response_id]
        return await self._pool.fleet.recall(f"response:{response_id}")
