"""The stack most integration tests stand on: simulated backends under uvicorn, the standalone pool
app in front of them, started and waited for until the pool has found every backend healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import Served, running, serving
from local_inference_pool.sim.simulator import SimulatedBackend


@dataclass
class Started:
    url: str  # the pool app's base URL (its API is under /v1)
    backends: list[SimulatedBackend]
    servers: list[Served]  # each backend's server, to stop one
    config: PoolConfig


def named(index: int, url: str) -> BackendConfig:
    """A backend as the tests name them: b0, b1, ..."""
    return BackendConfig(url=url, name=f"b{index}")


@asynccontextmanager
async def started(
    backends: list[SimulatedBackend],
    *,
    backend: Callable[[int, str], BackendConfig] = named,
    key: str | None = None,
    **pool: Any,
) -> AsyncIterator[Started]:
    """Serve ``backends`` and the pool in front of them until the block ends; every backend is
    healthy in the pool's status when it starts (within 5 s). ``key``: the pool's one API key."""
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serving(b)) for b in backends]
        config = PoolConfig(
            backends=tuple(backend(index, served.url) for index, served in enumerate(servers)),
            api_keys=(key,) if key else (),
            **{"health_interval": 0.5, **pool},
        )
        url = await stack.enter_async_context(running(create_standalone_app(config)))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=f"{url}/v1", headers=headers, trust_env=False) as http:
            with anyio.fail_after(5):
                while any(
                    b["health"] != "healthy" for b in (await http.get("/pool/status")).json()["backends"]
                ):
                    await anyio.sleep(0.02)
        yield Started(url, backends, servers, config)
