"""Handing a backend's answer to the client (``relay.py``): its headers, and the slot of every
answer released exactly once, whichever way the answer ends."""

from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.types import Message

from local_inference_pool.core.model import Grant
from local_inference_pool.gateway.relay import client_headers

from ..fakes import FakeBackend, Fleet
from .test_proxy import Client, Running, call, running_app


def test_hop_by_hop_headers_and_those_named_in_connection_never_reach_the_client() -> None:
    upstream = httpx.Response(
        200,
        headers=[
            ("Connection", "keep-alive, X-Backend-Secret, x-trace"),
            ("X-Backend-Secret", "s3cret"),
            ("x-trace", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ],
    )
    assert client_headers(upstream, [(b"x-backend", b"a")]) == [
        (b"content-type", b"application/json"),
        (b"x-backend", b"a"),
    ]


# --- the slot of every answer is released exactly once, on every path ------------------------

SCENARIOS = {
    "a small plain answer": ({"plain_size": 100}, {}, {}),
    "a large plain answer, relayed as it comes": ({"plain_size": 200_000}, {}, {}),
    "a stream to its end": ({"chunks": 5}, {}, {}),
    "the client leaves mid-stream (ASGI 2.3)": (
        {"chunks": 1000, "chunk_delay": 0.001},
        {"leave_after_chunks": 2},
        {},
    ),
    "the client leaves mid-stream (ASGI 2.4)": (
        {"chunks": 1000, "chunk_delay": 0.001},
        {"leave_after_chunks": 2, "spec": "2.4"},
        {},
    ),
    "the backend dies mid-stream": ({"chunks": 5, "fail_after": 2}, {}, {}),
    "the backend dies mid-stream, continued nowhere": (
        {"chunks": 5, "fail_after": 2},
        {},
        {"midstream_failovers": 0},
    ),
    "the backend answers 500": ({"mode": "status", "status": 500}, {}, {}),
    "the backend answers 503": ({"mode": "status", "status": 503}, {}, {}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_slot_is_released_exactly_once(scenario: str) -> None:
    backend, client_settings, pool_settings = SCENARIOS[scenario]
    fleet = Fleet(a=FakeBackend(**backend))  # type: ignore[arg-type]
    async with running_app(fleet, **pool_settings) as app:
        freed = count_releases(app)
        await call(app, Client(**client_settings))  # type: ignore[arg-type]
        assert freed.count(True) == 1  # one release freed the slot; any other was a no-op
        assert app.pool.scheduler.grants == {}


@pytest.mark.anyio
async def test_the_slot_is_released_exactly_once_when_the_request_task_is_cancelled() -> None:
    fleet = Fleet(a=FakeBackend(chunks=1000, chunk_delay=0.005))
    async with running_app(fleet) as app:
        freed = count_releases(app)
        client = Client()
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, client)
            with anyio.fail_after(5):
                while len(client.chunks) < 2:
                    await anyio.sleep(0.001)
            group.cancel_scope.cancel()
        assert freed.count(True) == 1
        assert app.pool.scheduler.grants == {}


@pytest.mark.anyio
async def test_the_slot_is_released_exactly_once_when_the_client_stops_reading() -> None:
    fleet = Fleet(a=FakeBackend(chunks=1000, chunk_delay=0.001))
    async with running_app(fleet, send_timeout=0.2) as app:
        freed = count_releases(app)
        client = Client()
        blocked = anyio.Event()

        async def send(message: Message) -> None:
            await client.send(message)
            if len(client.chunks) >= 2:
                blocked.set()
                await anyio.sleep_forever()  # its socket is full: the send never returns

        with anyio.fail_after(5):
            await app(client.scope(), client.receive, send)
        assert blocked.is_set()
        assert freed.count(True) == 1
        assert app.pool.scheduler.grants == {}


def count_releases(app: Running) -> list[bool]:
    """What each call of the scheduler's ``release`` returns from now on (True: it freed a slot)."""
    results: list[bool] = []
    scheduler = app.pool.scheduler
    release = scheduler.release

    def counted(grant: Grant) -> bool:
        results.append(release(grant))
        return results[-1]

    scheduler.release = counted  # type: ignore[method-assign]
    return results
