"""Streaming and every exit of a lease, by calling the ASGI app directly with scripted receive/send."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from local_inference_pool import Pool
from local_inference_pool.gateway.app import create_pool_app

from ..fakes import FakeBackend, Fleet

pytestmark = pytest.mark.anyio

BODY = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


class Client:
    """One scripted ASGI connection: sends BODY, records what comes back, can leave at any moment."""

    def __init__(
        self, *, leave_after_chunks: int | None = None, spec: str = "2.3", leave_at_once: bool = False
    ) -> None:
        self.messages: list[Message] = []
        self.gone = anyio.Event()
        self.leave_after_chunks = leave_after_chunks
        self.spec = spec
        self.sent_body = False
        if leave_at_once:
            self.gone.set()

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": self.spec},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/chat/completions",
            "raw_path": b"/chat/completions",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
            "client": ("127.0.0.1", 5000),
            "server": ("pool", 80),
            "state": {},
        }

    async def receive(self) -> Message:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone.is_set() and self.spec == "2.4":
            raise OSError("client went away")
        self.messages.append(message)
        if self.leave_after_chunks is not None and len(self.chunks) >= self.leave_after_chunks:
            self.gone.set()

    @property
    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body" and m.get("body")]

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    def headers(self) -> dict[str, str]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}


@dataclass
class Running:
    asgi: ASGIApp
    pool: Pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)


@asynccontextmanager
async def running_app(fleet: Fleet, **settings: Any) -> AsyncIterator[Running]:
    app = create_pool_app(fleet.config(**settings), transport=fleet.transport)
    async with LifespanManager(app) as manager:
        pool: Pool = app.state.runtime.pool
        with anyio.fail_after(5):
            while any(b.health.value != "healthy" for b in pool.scheduler.backends.values()):
                await anyio.sleep(0.01)
        yield Running(manager.app, pool)


def leases(app: Running) -> int:
    return len(app.pool.scheduler.grants)


async def call(app: Running, client: Client) -> None:
    with anyio.fail_after(5):
        await app(client.scope(), client.receive, client.send)


async def test_stream_is_relayed_chunk_by_chunk_and_the_slot_released_at_the_end() -> None:
    fleet = Fleet(a=FakeBackend(chunks=4))
    async with running_app(fleet) as app:
        client = Client()
        await call(app, client)
        assert leases(app) == 0
    assert client.status == 200
    headers = client.headers()
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert client.chunks == [f'data: {{"i": {i}}}\n\n'.encode() for i in range(4)] + [b"data: [DONE]\n\n"]
    assert fleet.backends["a"].closed == 0


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
async def test_client_leaving_mid_stream_closes_upstream_and_releases(spec: str) -> None:
    fleet = Fleet(a=FakeBackend(chunks=1000, chunk_delay=0.001))
    async with running_app(fleet) as app:
        client = Client(leave_after_chunks=2, spec=spec)
        await call(app, client)  # a client leaving is not an error: nothing escapes
        assert leases(app) == 0
    assert 2 <= len(client.chunks) < 1000
    assert fleet.backends["a"].closed == 1  # the backend saw its connection closed: it stops generating


async def test_upstream_failure_mid_stream_ends_with_an_sse_error_event() -> None:
    fleet = Fleet(a=FakeBackend(chunks=5, fail_after=2))
    async with running_app(fleet) as app:
        client = Client()
        await call(app, client)
        assert leases(app) == 0
    assert client.status == 200
    *relayed, last = client.chunks
    assert relayed == [b'data: {"i": 0}\n\n', b'data: {"i": 1}\n\n']
    assert last.startswith(b"data: ")
    assert last.endswith(b"\n\n")
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == "upstream_failed"
    assert "a:8080" in error["message"]


async def test_cancelling_the_request_task_mid_stream_releases() -> None:
    fleet = Fleet(a=FakeBackend(chunks=1000, chunk_delay=0.005))
    async with running_app(fleet) as app:
        client = Client()
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, client)
            with anyio.fail_after(5):
                while len(client.chunks) < 2:
                    await anyio.sleep(0.001)
            assert leases(app) == 1
            group.cancel_scope.cancel()
        assert leases(app) == 0
    assert fleet.backends["a"].closed == 1


async def test_client_leaving_while_queued_takes_no_slot() -> None:
    fleet = Fleet(a=FakeBackend(slots=1, mode="hang"))
    async with running_app(fleet) as app:
        holder = Client()
        async with anyio.create_task_group() as group:
            group.start_soon(app, holder.scope(), holder.receive, holder.send)
            with anyio.fail_after(5):
                while leases(app) < 1:
                    await anyio.sleep(0.001)
            quitter = Client()
            group.start_soon(app, quitter.scope(), quitter.receive, quitter.send)
            pool = app.pool
            with anyio.fail_after(5):
                while pool.scheduler.waiting < 1:
                    await anyio.sleep(0.001)
            quitter.gone.set()
            with anyio.fail_after(5):
                while pool.scheduler.waiting:
                    await anyio.sleep(0.001)
            assert leases(app) == 1  # only the holder's
            assert pool.scheduler.stats["cancelled"] == 1
            group.cancel_scope.cancel()
        assert leases(app) == 0
    assert len(fleet.backends["a"].requests) == 1


@pytest.mark.parametrize(
    "backend",
    [FakeBackend(plain_size=2000), FakeBackend(models=("other",)), FakeBackend(chunks=3)],
    ids=["plain answer", "pool's own error", "stream"],
)
async def test_a_client_gone_before_its_answer_under_asgi_2_4_is_not_an_error(backend: FakeBackend) -> None:
    """Under ASGI 2.4 a send to a client that left raises OSError: every kind of answer absorbs it."""
    async with running_app(Fleet(a=backend)) as app:
        client = Client(spec="2.4", leave_at_once=True)
        await call(app, client)  # nothing escapes
        assert leases(app) == 0
    assert client.messages == []


async def test_a_client_leaving_before_the_answer_abandons_the_upstream_request() -> None:
    fleet = Fleet(a=FakeBackend(mode="hang"))
    async with running_app(fleet) as app:
        client = Client()
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, client)
            with anyio.fail_after(5):
                while not fleet.backends["a"].requests:
                    await anyio.sleep(0.001)
            assert leases(app) == 1
            client.gone.set()
        assert leases(app) == 0  # the call returned, and gave the slot back
    assert fleet.backends["a"].abandoned == 1
    assert client.messages == []
