"""Run an ASGI app under uvicorn inside the current event loop (tests, the demo, ``serve``)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager, contextmanager
from typing import Literal

import anyio
import uvicorn
from starlette.types import ASGIApp


class _InProcessServer(uvicorn.Server):
    """Leaves signals alone: several servers share this process, and Ctrl-C belongs to its owner."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@asynccontextmanager
async def running(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    lifespan: Literal["auto", "on", "off"] = "auto",
) -> AsyncIterator[str]:
    """Serve ``app`` until the block ends; yields its base URL. ``port=0`` picks a free port.

    The socket is bound before uvicorn starts, so the port is known and cannot be taken meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan=lifespan, timeout_graceful_shutdown=5)
    server = _InProcessServer(config)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError(f"uvicorn failed to start on {host}:{bound_port}")
                await anyio.sleep(0.01)
        try:
            yield f"http://{host}:{bound_port}"
        finally:
            server.should_exit = True
