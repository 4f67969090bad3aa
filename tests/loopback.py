"""A minimal HTTP/1.1 server on 127.0.0.1 for tests that must go through a real socket."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketStream


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Reply:
    status: int
    body: object = None
    hang_up: bool = False  # read the request, then close the connection without an answer


@dataclass
class Loopback:
    url: str
    requests: list[Request] = field(default_factory=list)


Handler = Callable[[Request], Reply]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Loopback]:
    """Serve ``handler`` on a free loopback port until the block ends."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    loopback = Loopback(url=f"http://127.0.0.1:{port}")

    async def answer(stream: SocketStream) -> None:
        async with stream:
            raw = b""
            while b"\r\n\r\n" not in raw:
                try:
                    chunk = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return  # a client that connected and left without a request (a pool closing
                    # an idle connection it opened ahead): nothing to answer
                raw += chunk
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}
            request = Request(method, path, headers)
            loopback.requests.append(request)
            reply = handler(request)
            if reply.hang_up:
                return
            body = b"" if reply.body is None else json.dumps(reply.body).encode()
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(  # a client that gave up before the answer does not fail the test
                    f"HTTP/1.1 {reply.status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                    + body
                )

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        try:
            yield loopback
        finally:
            tg.cancel_scope.cancel()
