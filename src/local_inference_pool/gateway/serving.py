"""Run an ASGI app under uvicorn inside the current event loop (tests, the demo)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Literal

import anyio
import uvicorn
from starlette.types import ASGIApp


class InProcessServer(uvicorn.Server):
    """Leaves signals alone: several servers may share this process, and Ctrl-C belongs to its
    owner (the tests, the demo, ``serve``'s own signal handling)."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    stopped: anyio.Event

    async def stop(self) -> None:
        """Stop listening (new connections are refused), close connections, wait until done."""
        self.server.should_exit = True
        await self.stopped.wait()


@asynccontextmanager
async def serving(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    lifespan: Literal["auto", "on", "off"] = "auto",
    http: type[asyncio.Protocol] | str = "auto",
) -> AsyncIterator[Served]:
    """Serve ``app`` until the block ends (or ``stop()``). ``port=0`` picks a free port; ``http`` is
    uvicorn's protocol (``server_limits.bounded_protocol(config)`` for ``serve``'s head limits).

    The socket is bound before uvicorn starts, so the port is known and cannot be taken meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=log_level, lifespan=lifespan, timeout_graceful_shutdown=5, http=http
    )
    server = InProcessServer(config)
    served = Served(f"http://{host}:{bound_port}", server, anyio.Event())

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            sock.close()
            served.stopped.set()

    async with anyio.create_task_group() as group:
        group.start_soon(serve)
        with anyio.fail_after(10):
            while not server.started:
                if served.stopped.is_set():
                    raise RuntimeError(f"uvicorn failed to start on {host}:{bound_port}")
                await anyio.sleep(0.01)
        try:
            yield served
        finally:
            server.should_exit = True


@asynccontextmanager
async def running(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    lifespan: Literal["auto", "on", "off"] = "auto",
) -> AsyncIterator[str]:
    """``serving`` for callers that only need the base URL."""
    async with serving(app, host=host, port=port, log_level=log_level, lifespan=lifespan) as served:
        yield served.url
