"""The upstream transport against scripted loopback servers: a conformance suite.

Each case scripts a backend's exact bytes and asserts exactly what the pool's transport makes of them:
1xx interim answers, 101, framings, splits at any point (against h11 as the reference parser), SSE
with LF and CRLF, resets, oversized heads, refused and timed-out connections, and that a POST whose
connection died after it was written is never sent again by the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import h11
import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from local_inference_pool.upstream.transport import MAX_HEAD_FIELD, AiohttpTransport

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


LIMITS = httpx.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=4.0)


def transport(**kwargs: object) -> AiohttpTransport:
    return AiohttpTransport(LIMITS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def upstream() -> AsyncIterator[AiohttpTransport]:
    """A transport for one test, closed after it whatever happens."""
    made = transport()
    yield made
    await made.aclose()


async def test_answers_come_back_and_connections_are_reused(upstream: AiohttpTransport) -> None:
    async with server(ok) as srv:
        for i in range(5):
            response = await upstream.handle_async_request(request(srv.url, b"%d" % i))
            assert response.status_code == 200
            assert await read_all(response) == b"echo:%d" % i
        assert srv.connections == 1
        assert srv.requests[0].head.startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in srv.requests[0].head


async def test_through_an_httpx_client() -> None:
    async with server(ok) as srv, httpx.AsyncClient(transport=transport(), base_url=srv.url) as client:
        response = await client.post("/v1/x", content=b"abc")
        assert response.text == "echo:abc"


async def test_no_cookie_is_kept_for_the_next_request(upstream: AiohttpTransport) -> None:
    async def sets_a_cookie(exchange: Exchange) -> bool:
        await exchange.send(answer(b"ok", extra=b"set-cookie: session=client-a; Path=/\r\n"))
        return True

    async with server(sets_a_cookie) as srv:
        for _ in range(2):
            await read_all(await upstream.handle_async_request(request(srv.url)))
        assert all(b"cookie" not in e.head.lower().replace(b"set-cookie", b"") for e in srv.requests)


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints\r\nlink: </x>; rel=preload"])
async def test_an_interim_answer_is_skipped_and_never_reaches_the_next_request(
    interim: bytes, upstream: AiohttpTransport
) -> None:
    async def interim_first(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 " + interim + b"\r\n\r\n")
        await exchange.send(answer(b"for:" + exchange.body))
        return True

    async with server(interim_first) as srv:
        for who in (b"client-a", b"client-b", b"client-c"):
            response = await upstream.handle_async_request(request(srv.url, who))
            assert (response.status_code, await read_all(response)) == (200, b"for:" + who)
        assert srv.connections == 1  # one keep-alive connection, each answer to its own request


async def test_switching_protocols_is_an_error_not_an_answer(upstream: AiohttpTransport) -> None:
    async def upgrades(exchange: Exchange) -> bool:
        await exchange.send(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        return True

    async with server(upgrades) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="switched protocols"):
            await upstream.handle_async_request(request(srv.url))


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the connection closes", b"until the connection closes"),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nclose-delimited", b"close-delimited"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "http-1.0-until-close", "close-delimited", "no-content"],
)
async def test_body_framings(raw: bytes, body: bytes, upstream: AiohttpTransport) -> None:
    async def handler(exchange: Exchange) -> bool:
        await exchange.send(raw)
        return b"close" not in raw and raw.startswith(b"HTTP/1.1")

    async with server(handler) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        assert await read_all(response) == body
        assert response.extensions["http_version"] in (b"HTTP/1.1", b"HTTP/1.0")


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
async def test_an_event_stream_is_relayed_as_it_arrives(newline: bytes, upstream: AiohttpTransport) -> None:
    go_on = asyncio.Event()
    first = b"data: one" + newline + newline

    async def handler(exchange: Exchange) -> bool:
        await exchange.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        await exchange.send(b"%x\r\n%s\r\n" % (len(first), first))
        await go_on.wait()
        last = b"data: [DONE]" + newline + newline
        await exchange.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
        return True

    async with server(handler) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        chunks = response.aiter_raw()
        async with asyncio.timeout(2):
            assert await anext(chunks) == first  # while the server still holds the rest
        go_on.set()
        assert b"".join([c async for c in chunks]) == b"data: [DONE]" + newline + newline
        await response.aclose()


async def test_https_checks_the_certificate() -> None:
    authority = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_side)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with server(ok, tls=server_side) as srv:
        upstream = transport(ssl_context=trusting)
        assert await read_all(await upstream.handle_async_request(request(srv.url, b"tls"))) == b"echo:tls"
        await upstream.aclose()
        untrusting = transport()  # the system's authorities: this one is not among them
        with pytest.raises(httpx.ConnectError, match="certificate"):
            await untrusting.handle_async_request(request(srv.url))
        await untrusting.aclose()


async def test_a_refused_connection_is_a_connect_error(upstream: AiohttpTransport) -> None:
    async with server(ok) as srv:
        url = srv.url
    with pytest.raises(httpx.ConnectError, match="cannot connect"):
        await upstream.handle_async_request(request(url))


async def test_no_headers_in_time_is_a_read_timeout(upstream: AiohttpTransport) -> None:
    async def silent(exchange: Exchange) -> bool:
        await asyncio.sleep(3)
        return False

    async with server(silent) as srv:
        with pytest.raises(httpx.ReadTimeout):
            await upstream.handle_async_request(request(srv.url, read=0.1))


async def test_a_stalled_body_is_a_read_timeout(upstream: AiohttpTransport) -> None:
    async def stalls(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await asyncio.sleep(3)
        return False

    async with server(stalls) as srv:
        response = await upstream.handle_async_request(request(srv.url, read=0.1))
        with pytest.raises(httpx.ReadTimeout):
            await read_all(response)


async def test_a_server_dying_mid_body_is_a_read_error(upstream: AiohttpTransport) -> None:
    async def dies(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        return False

    async with server(dies) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        with pytest.raises(httpx.ReadError, match="broke off"):
            await read_all(response)


async def test_a_reset_after_the_headers_is_a_read_error(upstream: AiohttpTransport) -> None:
    async def resets(exchange: Exchange) -> bool:
        await exchange.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndata\r\n")
        sock = exchange.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        exchange.writer.transport.abort()  # RST, not FIN
        return False

    async with server(resets) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        with pytest.raises(httpx.ReadError):
            await read_all(response)


async def test_an_answer_that_is_not_http_is_a_protocol_error(upstream: AiohttpTransport) -> None:
    async def garbage(exchange: Exchange) -> bool:
        await exchange.send(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    async with server(garbage) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="not valid HTTP"):
            await upstream.handle_async_request(request(srv.url))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD_FIELD + 1) + b"\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"x-%d: 1\r\n" % i for i in range(200))
        + b"content-length: 0\r\n\r\n",
    ],
    ids=["one-huge-header", "too-many-headers"],
)
async def test_an_oversized_answer_head_is_refused(head: bytes, upstream: AiohttpTransport) -> None:
    async def oversized(exchange: Exchange) -> bool:
        await exchange.send(head)
        return True

    async with server(oversized) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="not valid HTTP"):
            await upstream.handle_async_request(request(srv.url))


async def hangs_up_on_the_second(exchange: Exchange) -> bool:
    """Answers a connection's first request; reads its second, then hangs up without an answer."""
    if exchange.nth_on_connection == 2:
        return False
    await ok(exchange)
    return True


async def test_a_post_whose_connection_dies_after_it_was_written_is_not_sent_again(
    upstream: AiohttpTransport,
) -> None:
    async with server(hangs_up_on_the_second) as srv:
        assert await read_all(await upstream.handle_async_request(request(srv.url, b"1"))) == b"echo:1"
        with pytest.raises(httpx.RemoteProtocolError, match="disconnected"):
            await upstream.handle_async_request(request(srv.url, b"2"))
        assert [e.body for e in srv.requests] == [b"1", b"2"]  # the POST was seen once


async def test_a_get_on_a_connection_the_server_closed_is_retried(upstream: AiohttpTransport) -> None:
    async with server(hangs_up_on_the_second) as srv:
        await read_all(await upstream.handle_async_request(request(srv.url, b"", method="GET")))
        response = await upstream.handle_async_request(request(srv.url, b"", method="GET"))
        assert response.status_code == 200  # idempotent: sent again on a new connection
        await read_all(response)
        assert srv.connections == 2


async def test_a_response_closed_early_closes_its_connection(upstream: AiohttpTransport) -> None:
    seen_close = asyncio.Event()

    async def long_answer(exchange: Exchange) -> bool:
        if exchange.connection == 2:
            await ok(exchange)
            return True
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        with contextlib.suppress(ConnectionError):
            await asyncio.sleep(0.2)
            await exchange.send(b"defghij")
            await asyncio.sleep(0.2)
            await exchange.send(b"")
        seen_close.set()
        return False

    async with server(long_answer) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        await response.aclose()  # before the end: the connection cannot carry another request
        assert await read_all(await upstream.handle_async_request(request(srv.url))) == b"echo:hi"
        assert srv.connections == 2


async def test_connections_are_limited_and_waiting_for_one_is_a_pool_timeout() -> None:
    gate = asyncio.Event()

    async def held(exchange: Exchange) -> bool:
        await gate.wait()
        await ok(exchange)
        return True

    upstream = AiohttpTransport(httpx.Limits(max_connections=1, max_keepalive_connections=1))
    async with server(held) as srv:
        first = asyncio.create_task(upstream.handle_async_request(request(srv.url, b"1")))
        while not srv.requests:
            await asyncio.sleep(0.01)
        with pytest.raises(httpx.PoolTimeout):
            await upstream.handle_async_request(request(srv.url, b"2"))
        second = asyncio.create_task(upstream.handle_async_request(request(srv.url, b"3")))
        gate.set()
        assert await read_all(await first) == b"echo:1"
        assert await read_all(await second) == b"echo:3"  # waited for the first, then reused it
        assert srv.connections == 1
    await upstream.aclose()


async def test_the_count_of_held_connections_ends_at_zero_on_every_path(upstream: AiohttpTransport) -> None:
    """The count tells a wait for a connection from a slow connect (a pool timeout from a connect
    timeout): it must come back to zero whether an answer was read, closed early or never came."""
    async with server(ok) as srv:
        await read_all(await upstream.handle_async_request(request(srv.url)))
        read_unclosed = await upstream.handle_async_request(request(srv.url))
        async for _chunk in read_unclosed.aiter_raw():  # read to the end, never closed
            pass
        await (await upstream.handle_async_request(request(srv.url))).aclose()  # closed unread
    async with server(ok) as gone:
        url = gone.url
    with pytest.raises(httpx.ConnectError):
        await upstream.handle_async_request(request(url))  # refused: no answer came
    assert upstream._holding == 0


async def test_a_reader_that_falls_behind_stops_the_socket_being_read(upstream: AiohttpTransport) -> None:
    total = 64 * 1024 * 1024
    sent = 0
    stalled = asyncio.Event()

    async def firehose(exchange: Exchange) -> bool:
        nonlocal sent
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            exchange.writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(exchange.writer.drain(), 0.3)
            except TimeoutError:
                stalled.set()  # the pool stopped reading: the socket buffers are full
                await exchange.writer.drain()
        return True

    async with server(firehose) as srv:
        response = await upstream.handle_async_request(request(srv.url))
        await asyncio.wait_for(stalled.wait(), 10)
        assert sent < total // 4
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
        await response.aclose()
        assert received == total


async def test_a_closed_transport_refuses_new_requests() -> None:
    upstream = transport()
    async with server(ok) as srv:
        await read_all(await upstream.handle_async_request(request(srv.url)))
        await upstream.aclose()
        with pytest.raises(httpx.ConnectError, match="closed"):
            await upstream.handle_async_request(request(srv.url))


# --- the same bytes through the transport and through h11, split anywhere ----------------------

FRAMINGS = st.sampled_from(["length", "chunked", "close"])


def reference(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """What h11, as a client that sent a GET, makes of ``raw``."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("host", "h")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(raw)
    connection.receive_data(b"")
    status, headers, body = 0, [], b""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Response):
            status, headers = event.status_code, [(k, v) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.NEED_DATA:
            return status, headers, body


def framed(status: int, headers: list[tuple[bytes, bytes]], body: bytes, framing: str) -> bytes:
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(b"%s: %s\r\n" % h for h in headers)
    if framing == "length":
        return head + b"content-length: %d\r\n\r\n" % len(body) + body
    if framing == "chunked":
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        return (
            head
            + b"transfer-encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            + b"0\r\n\r\n"
        )
    return head + b"connection: close\r\n\r\n" + body


async def through_the_transport(raw: bytes, cuts: list[int]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    async def pieces(exchange: Exchange) -> bool:
        edges = [0, *sorted(cuts), len(raw)]
        for start, end in itertools.pairwise(edges):
            await exchange.send(raw[start:end])
            await asyncio.sleep(0)
        return False

    upstream = transport()
    try:
        async with server(pieces) as srv:
            response = await upstream.handle_async_request(request(srv.url, b"", method="GET"))
            body = await read_all(response)
            headers = [(k.lower(), v) for k, v in response.headers.raw]
            return response.status_code, headers, body
    finally:
        await upstream.aclose()


@settings(max_examples=40, deadline=None)
@given(
    status=st.sampled_from([200, 201, 400, 404, 500, 503]),
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"x-a", b"content-type", b"x-request-id"]),
            st.binary(min_size=1, max_size=20).map(lambda b: bytes(c % 26 + 97 for c in b)),
        ),
        max_size=4,
    ),
    body=st.binary(max_size=300),
    framing=FRAMINGS,
    data=st.data(),
)
def test_any_split_of_any_answer_parses_as_h11_does(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, framing: str, data: st.DataObject
) -> None:
    raw = framed(status, headers, body, framing)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), unique=True, max_size=12))
    got = anyio.run(through_the_transport, raw, cuts)
    assert got == reference(raw)
