"""A scripted fleet of fake backends behind ``httpx.MockTransport``, for the app's shared client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from local_inference_pool import BackendConfig, PoolConfig


@dataclass
class FakeBackend:
    models: tuple[str, ...] = ("m",)
    slots: int = 2
    mode: str = "ok"  # ok | refuse | timeout | status | hang
    status: int = 500
    body: dict[str, Any] = field(
        default_factory=lambda: {"error": {"message": "boom", "type": "server_error"}}
    )
    chunks: int = 3  # SSE chunks for a streamed answer
    fail_after: int | None = None  # raise a read error after this many chunks
    chunk_delay: float = 0.0
    plain_size: int | None = None  # answer with this many bytes of JSON, streamed without a length
    closed: int = 0  # upstream streams closed (by us) before they ended
    abandoned: int = 0  # requests the pool stopped waiting for before any answer (mode "hang")
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    usage: dict[str, Any] | None = None  # in a plain answer, and in a stream's last chunk
    headers: dict[str, str] = field(default_factory=dict)  # on every answer to a request


class Fleet:
    def __init__(self, **backends: FakeBackend) -> None:
        self.backends = backends

    def config(self, **pool: Any) -> PoolConfig:
        pool.setdefault("health_interval", 60.0)
        return PoolConfig(
            backends=tuple(
                BackendConfig(url=f"http://{name}:8080", api_key=f"key-{name}") for name in self.backends
            ),
            **pool,
        )

    def transport(self, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        backend = self.backends[request.url.host]
        path = request.url.path
        if backend.mode == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/props":
            return httpx.Response(200, json={"total_slots": backend.slots})
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in backend.models]})
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"code": 404, "message": "File Not Found"}})
        backend.requests.append(request)
        body = await request.aread()
        backend.bodies.append(body)
        if backend.mode == "timeout":
            raise httpx.ReadTimeout("no headers", request=request)
        if backend.mode == "hang":
            try:
                await anyio.sleep_forever()
            finally:
                backend.abandoned += 1  # the pool gave up on the request: its connection would close
        if backend.mode == "status":
            return httpx.Response(backend.status, json=backend.body)
        if backend.mode == "broken_json":  # declares its length, then dies halfway through the body
            return httpx.Response(
                200,
                headers={"content-type": "application/json", "content-length": "64"},
                stream=BrokenBody(request),
            )
        payload = json.loads(body) if body.startswith(b"{") else {}
        if backend.plain_size is not None:
            return httpx.Response(
                200, headers={"content-type": "application/json"}, stream=PlainBody(backend.plain_size)
            )
        if payload.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream", **backend.headers},
                stream=FakeSSE(backend, request),
            )
        answer = {"object": "chat.completion", "model": payload.get("model"), "served_by": request.url.host}
        if backend.usage is not None:
            answer["usage"] = backend.usage
        return httpx.Response(200, json=answer, headers=backend.headers)


class FakeSSE(httpx.AsyncByteStream):
    """An upstream event stream that, like a real connection, notices being closed before its end."""

    def __init__(self, backend: FakeBackend, request: httpx.Request) -> None:
        self.backend = backend
        self.request = request
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        backend = self.backend
        for index in range(backend.chunks):
            if backend.fail_after is not None and index >= backend.fail_after:
                raise httpx.ReadError("backend went away", request=self.request)
            await anyio.sleep(backend.chunk_delay)
            yield f'data: {{"i": {index}}}\n\n'.encode()
        if backend.usage is not None:
            yield f"data: {json.dumps({'choices': [], 'usage': backend.usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"
        self.finished = True

    async def aclose(self) -> None:
        if not self.finished:
            self.backend.closed += 1


class BrokenBody(httpx.AsyncByteStream):
    def __init__(self, request: httpx.Request) -> None:
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"object": "chat.completion", "choi'
        raise httpx.ReadError("backend went away", request=self.request)


class PlainBody(httpx.AsyncByteStream):
    """A JSON answer of ``size`` bytes in 64 KiB pieces, with no declared length (chunked on the wire)."""

    def __init__(self, size: int) -> None:
        self.data = plain_answer(size)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 65536):
            yield self.data[start : start + 65536]


def plain_answer(size: int) -> bytes:
    head = b'{"object": "chat.completion", "usage": {"completion_tokens": 7}, "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'
