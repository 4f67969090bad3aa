"""Http1Transport against scripted loopback servers: framing, keep-alive, failures, backpressure."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from local_inference_pool.transport import HIGH_WATER, Http1Transport, _Connection

pytestmark = pytest.mark.anyio

Handler = Callable[["Exchange"], Awaitable[bool]]  # returns whether to keep the connection open


@dataclass
class Exchange:
    """One request as the server read it, and the connection to answer on."""

    head: bytes
    body: bytes
    connection: int
    nth_on_connection: int
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[Exchange] = field(default_factory=list)


@asynccontextmanager
async def server(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    state = Server(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        number, nth = state.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                nth += 1
                exchange = Exchange(head, body, number, nth, writer)
                state.requests.append(exchange)
                if not await handler(exchange):
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    scheme = "https" if tls else "http"
    state.url = f"{scheme}://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        listener.close()


def answer(body: bytes, *, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d OK\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


async def ok(exchange: Exchange) -> bool:
    await exchange.send(answer(b"echo:" + exchange.body))
    return True


def request(
    url: str, body: bytes = b"hi", *, read: float | None = 5.0, method: str = "POST"
) -> httpx.Request:
    timeouts = {"connect": 2.0, "read": read, "write": 2.0, "pool": 0.5}
    return httpx.Request(method, url + "/v1/x", content=body, extensions={"timeout": timeouts})


async def read_all(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def test_answers_come_back_and_connections_are_reused() -> None:
    transport = Http1Transport()
    async with server(ok) as srv:
        for i in range(5):
            response = await transport.handle_async_request(request(srv.url, b"%d" % i))
            assert response.status_code == 200
            assert await read_all(response) == b"echo:%d" % i
        assert srv.connections == 1
        assert srv.requests[0].head.startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in srv.requests[0].head
    await transport.aclose()


async def test_through_an_httpx_client() -> None:
    async with server(ok) as srv, httpx.AsyncClient(transport=Http1Transport(), base_url=srv.url) as client:
        response = await client.post("/v1/x", content=b"abc")
        assert response.text == "echo:abc"


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the connection closes", b"until the connection closes"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "until-close", "no-content"],
)
async def test_body_framings(raw: bytes, body: bytes) -> None:
    async def handler(exchange: Exchange) -> bool:
        await exchange.send(raw)
        return raw.startswith(b"HTTP/1.1")

    transport = Http1Transport()
    async with server(handler) as srv:
        response = await transport.handle_async_request(request(srv.url))
        assert await read_all(response) == body
        assert response.extensions["http_version"] in (b"HTTP/1.1", b"HTTP/1.0")
    await transport.aclose()


async def test_a_body_is_streamed_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def handler(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await go_on.wait()
        await exchange.send(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    transport = Http1Transport()
    async with server(handler) as srv:
        response = await transport.handle_async_request(request(srv.url))
        chunks = response.aiter_raw()
        async with asyncio.timeout(2):
            assert await anext(chunks) == b"first"  # while the server still holds the rest
        go_on.set()
        assert [c async for c in chunks] == [b"second"]
        await response.aclose()
    await transport.aclose()


async def test_https_checks_the_certificate() -> None:
    authority = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_side)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with server(ok, tls=server_side) as srv:
        transport = Http1Transport(ssl_context=trusting)
        assert await read_all(await transport.handle_async_request(request(srv.url, b"tls"))) == b"echo:tls"
        await transport.aclose()
        untrusting = Http1Transport()  # the system's authorities: this one is not among them
        with pytest.raises(httpx.ConnectError, match="certificate"):
            await untrusting.handle_async_request(request(srv.url))
        await untrusting.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with server(ok) as srv:
        url = srv.url
    transport = Http1Transport()
    with pytest.raises(httpx.ConnectError, match="cannot connect"):
        await transport.handle_async_request(request(url))
    await transport.aclose()


async def test_no_headers_in_time_is_a_read_timeout_and_the_connection_is_dropped() -> None:
    async def silent(exchange: Exchange) -> bool:
        await asyncio.sleep(3)
        return False

    transport = Http1Transport()
    async with server(silent) as srv:
        with pytest.raises(httpx.ReadTimeout, match="response headers"):
            await transport.handle_async_request(request(srv.url, read=0.1))
        assert transport._open == 0
    await transport.aclose()


async def test_a_stalled_body_is_a_read_timeout() -> None:
    async def stalls(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await asyncio.sleep(3)
        return False

    transport = Http1Transport()
    async with server(stalls) as srv:
        response = await transport.handle_async_request(request(srv.url, read=0.1))
        with pytest.raises(httpx.ReadTimeout, match="body data"):
            await read_all(response)
        assert transport._open == 0
    await transport.aclose()


async def test_a_server_dying_mid_body_is_a_protocol_error() -> None:
    async def dies(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        return False

    transport = Http1Transport()
    async with server(dies) as srv:
        response = await transport.handle_async_request(request(srv.url))
        with pytest.raises(httpx.RemoteProtocolError, match="before the response was complete"):
            await read_all(response)
    await transport.aclose()


async def test_an_answer_that_is_not_http_is_a_protocol_error() -> None:
    async def garbage(exchange: Exchange) -> bool:
        await exchange.send(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    transport = Http1Transport()
    async with server(garbage) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="not valid HTTP"):
            await transport.handle_async_request(request(srv.url))
    await transport.aclose()


async def test_a_reused_connection_the_server_closed_is_retried_once_on_a_new_one() -> None:
    async def closes_idle_ones(exchange: Exchange) -> bool:
        if exchange.nth_on_connection == 2:
            return False  # as a server whose idle timeout fires just as the request arrives
        await ok(exchange)
        return True

    transport = Http1Transport()
    async with server(closes_idle_ones) as srv:
        assert await read_all(await transport.handle_async_request(request(srv.url, b"1"))) == b"echo:1"
        assert await read_all(await transport.handle_async_request(request(srv.url, b"2"))) == b"echo:2"
        assert srv.connections == 2
        assert [e.body for e in srv.requests] == [b"1", b"2", b"2"]
    await transport.aclose()


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    async def hangs_up(exchange: Exchange) -> bool:
        return False

    transport = Http1Transport()
    async with server(hangs_up) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await transport.handle_async_request(request(srv.url))
        assert len(srv.requests) == 1
    await transport.aclose()


async def test_a_response_closed_early_closes_its_connection() -> None:
    async def long_answer(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await asyncio.sleep(0.2)
        await exchange.send(b"defghij")
        return True

    transport = Http1Transport()
    async with server(long_answer) as srv:
        response = await transport.handle_async_request(request(srv.url))
        await response.aclose()  # before the end: the connection cannot carry another request
        assert await read_all(await transport.handle_async_request(request(srv.url))) == b"abcdefghij"
        assert srv.connections == 2
    await transport.aclose()


async def test_connections_are_limited_and_waiting_for_one_times_out() -> None:
    gate = asyncio.Event()

    async def held(exchange: Exchange) -> bool:
        await gate.wait()
        await ok(exchange)
        return True

    transport = Http1Transport(httpx.Limits(max_connections=1, max_keepalive_connections=1))
    async with server(held) as srv:
        first = asyncio.create_task(transport.handle_async_request(request(srv.url, b"1")))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await transport.handle_async_request(request(srv.url, b"2"))
        second = asyncio.create_task(transport.handle_async_request(request(srv.url, b"3")))
        gate.set()
        assert await read_all(await first) == b"echo:1"
        assert await read_all(await second) == b"echo:3"  # waited for the first, then reused it
        assert srv.connections == 1
    await transport.aclose()


async def test_a_reader_that_falls_behind_stops_the_socket_being_read() -> None:
    total = 64 * 1024 * 1024
    sent = 0

    async def firehose(exchange: Exchange) -> bool:
        nonlocal sent
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            await exchange.send(block)
            sent += len(block)
        return True

    transport = Http1Transport()
    async with server(firehose) as srv:
        response = await transport.handle_async_request(request(srv.url))
        await asyncio.sleep(0.5)  # not reading: only socket buffers and the high-water mark fill
        assert sent < total // 4
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
        await response.aclose()
        assert received == total
    await transport.aclose()


async def test_closing_the_transport_closes_idle_connections() -> None:
    transport = Http1Transport()
    async with server(ok) as srv:
        await read_all(await transport.handle_async_request(request(srv.url)))
        assert transport._open == 1
        await transport.aclose()
        assert transport._open == 0
        with pytest.raises(httpx.ConnectError, match="closed"):
            await transport.handle_async_request(request(srv.url))


class _FakeSocket:
    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n"
    + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (b"data: one\n\n", b"data: two\n\n", b"x" * 300)
    )
    + b"0\r\n\r\n"
)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(CHUNKED) - 1), unique=True, max_size=30))
def test_any_split_of_the_bytes_parses_the_same(cuts: list[int]) -> None:
    connection = _Connection(("http", "h", 80))
    connection.connection_made(_FakeSocket())  # type: ignore[arg-type]
    connection.send(b"GET / HTTP/1.1\r\n\r\n", b"")
    edges = [0, *sorted(cuts), len(CHUNKED)]
    for start, end in itertools.pairwise(edges):
        connection.data_received(CHUNKED[start:end])
    assert connection.error is None
    assert connection.complete
    assert connection.keep_alive
    assert (connection.status, connection.headers[-1]) == (200, (b"x-a", b"1"))
    assert connection.take_body() == b"data: one\n\ndata: two\n\n" + b"x" * 300


def test_unread_body_past_the_high_water_mark_pauses_reading() -> None:
    socket = _FakeSocket()
    connection = _Connection(("http", "h", 80))
    connection.connection_made(socket)  # type: ignore[arg-type]
    connection.send(b"GET / HTTP/1.1\r\n\r\n", b"")
    connection.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (HIGH_WATER * 2))
    connection.data_received(b"x" * (HIGH_WATER + 1))
    assert socket.paused
    assert len(connection.take_body()) == HIGH_WATER + 1
    assert not socket.paused
