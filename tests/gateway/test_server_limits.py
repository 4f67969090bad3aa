"""serve's head limits over real sockets: sizes, field counts and time, answered before the app runs."""

from __future__ import annotations

import logging

import anyio
import pytest
from starlette.types import Receive, Scope, Send

from local_inference_pool.config import PoolConfig
from local_inference_pool.gateway.server_limits import ClientLeftFilter, bounded_protocol
from local_inference_pool.gateway.serving import serving

pytestmark = pytest.mark.anyio

CONFIG = PoolConfig(header_timeout=0.3, max_header_size=4096, max_headers=20)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(data)
        received = b""
        with anyio.fail_after(5):
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8192 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000,  # never finished, still refused
        b"GET / HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(30)) + b"\r\n",
    ],
    ids=["large-header", "large-unfinished-header", "too-many-fields"],
)
async def test_an_oversized_request_head_is_431_and_closed(head: bytes) -> None:
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(served.url, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def test_a_large_body_sent_with_its_head_in_one_write_is_not_mistaken_for_a_large_head() -> None:
    body = b"x" * 200_000
    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    async with serving(echo_length, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(served.url, head + body)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"200000")


async def test_an_unfinished_head_is_408_after_the_header_timeout() -> None:
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(served.url, b"GET / HTTP/1.1\r\nhost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(served.url, b"")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_later_head_left_unfinished_is_408_after_the_header_timeout() -> None:
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(served.url, b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 408 " in answer


async def test_a_later_head_left_unfinished_after_an_answer_is_408() -> None:
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        host, port = served.url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
                await stream.send(b"GET / HTTP/1.1\r\nhost: x\r\n")  # a read that leaves it unfinished
                answer = b""
                try:
                    while True:
                        answer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_requests_within_the_limits_are_served_on_one_connection() -> None:
    request = b"GET / HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(15)) + b"\r\n"
    async with serving(app, http=bounded_protocol(CONFIG)) as served:
        answer = await exchange(
            served.url, request * 3 + b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
    assert answer.count(b"HTTP/1.1 200 OK") == 4


def test_an_unfinished_response_is_logged_as_the_client_leaving() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.ERROR,
        "",
        0,
        "ASGI callable returned without completing response.",
        None,
        None,
    )
    assert ClientLeftFilter().filter(record)
    assert (record.levelno, record.getMessage()) == (
        logging.INFO,
        "the client left before its response was complete",
    )
