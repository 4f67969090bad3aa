"""A lean HTTP/1.1 transport for the shared httpx client: keep-alive connections, httptools parsing.

Why not httpx's own pool or aiohttp under it: a gateway spends much of its time in its HTTP client.
Client CPU per small request to a local backend, measured on this machine: httpx 0.28 over
httpx-aiohttp 472 µs, aiohttp alone 197 µs, this transport 125 µs including building the
``httpx.Request`` (a bare httptools protocol: 36 µs); through ``AsyncClient`` at concurrency 32,
``bench/transport.py``: 275 µs here, 411 µs over httpx-aiohttp, 4,088 µs over httpx's own pool. It speaks
only what local inference servers need: HTTP/1.1 (and 1.0 answers), ``http`` and ``https``,
``Content-Length``, chunked and read-until-close bodies, keep-alive.

What it does that matters for a proxy:
- the body is streamed as it arrives, with backpressure: past ``HIGH_WATER`` unread bytes the socket
  stops being read until the reader catches up, so a slow client slows the backend, never memory;
- a connection goes back to the pool only after its response was read to the end and both sides
  allow keep-alive; a response closed early closes its connection (the backend sees it and stops);
- a request whose reused keep-alive connection turns out closed by the server before any byte of the
  answer (the idle-timeout race every HTTP client has) is sent again once on a new connection, as
  Go's net/http does; nothing else is ever retried here;
- errors are httpx's own: ``ConnectError`` (refused), ``ConnectTimeout``, ``ReadTimeout`` (no
  headers or no next chunk within the read timeout), ``RemoteProtocolError`` (disconnected before
  the answer was whole, or an answer that is not HTTP), ``PoolTimeout``. There is no separate write
  timeout: a request is written to the socket's buffer at once, and a server that does not read it
  does not answer it either, which the read timeout catches.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools
import httpx

__all__ = ["Http1Transport"]

HIGH_WATER: Final = 256 * 1024  # unread body bytes before the socket is paused
DEFAULT_LIMITS: Final = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=4.0)
_NO_BODY_STATUS: Final = frozenset({204, 304})

Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One TCP connection: sends one request at a time and parses its answer as bytes arrive."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.discarded = False
        self.in_flight = False  # a request was sent and its answer is not yet handed back
        self.idle_since = 0.0
        self.requests = 0  # answers started on this connection (0: a fresh connection)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = True  # body framed by the connection closing (no length, not chunked)
        self.error: httpx.TransportError | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.got_bytes = False
        self.waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but is one

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:  # bytes nobody asked for: this connection cannot be trusted again
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the server switched protocols, which a proxy cannot relay"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the server's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and self.until_close and not self.complete and self.error is None:
            self.complete = True  # a body without framing ends when the connection does
        elif not self.complete and self.error is None:
            if not self.headers_done:
                message = "the server disconnected without sending a response"
            else:
                message = "the server disconnected before the response was complete"
            self.error = httpx.RemoteProtocolError(message + (f": {exc}" if exc else ""))
        self._wake()

    # --- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self.until_close = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.status in _NO_BODY_STATUS or 100 <= self.status < 200:
            self.until_close = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # --- used by the transport and the response stream

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, head: bytes, body: bytes) -> None:
        self._reset()
        self.requests += 1
        self.in_flight = True
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    async def wait(self, timeout: float | None, what: str) -> None:
        """Until the parser has more to say, or ``timeout`` seconds pass (then ReadTimeout)."""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._time_out, waiter, timeout, what)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def _time_out(self, waiter: asyncio.Future[None], timeout: float, what: str) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout(f"no {what} from the server within {timeout:g}s"))

    def take_body(self) -> bytes:
        """Everything buffered, joined: one send downstream however the socket split it."""
        chunk = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self, transport: Http1Transport, connection: _Connection, read_timeout: float | None
    ) -> None:
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while not self._done:
            if connection.body:
                yield connection.take_body()
            elif connection.complete:
                break
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait(self._read_timeout, "body data")

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        connection = self._connection
        reusable = connection.complete and connection.keep_alive and not connection.body
        self._transport._give_back(connection, reusable=reusable and connection.error is None)


class Http1Transport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport``: pass it as ``httpx.AsyncClient(transport=...)``."""

    def __init__(self, limits: httpx.Limits = DEFAULT_LIMITS, *, ssl_context: ssl.SSLContext | None = None):
        self._max_connections = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._keepalive = limits.keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections counted against max_connections, idle or busy
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"only http and https are supported, not {scheme!r}")
        origin: Origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        head = _request_head(request)
        body = await _request_body(request)
        retried = False
        while True:
            connection = await self._connection(origin, timeouts)
            reused = connection.requests > 0
            try:
                connection.send(head, body)
                while not connection.headers_done:
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait(timeouts.get("read"), "response headers")
            except httpx.RemoteProtocolError:
                self._give_back(connection, reusable=False)
                if reused and not connection.got_bytes and not retried and not isinstance(body, _Streamed):
                    retried = True  # the server had closed this idle connection: send on a new one
                    continue
                raise
            except BaseException:
                self._give_back(connection, reusable=False)
                raise
            break
        if request.method == "HEAD" or connection.status in _NO_BODY_STATUS:
            connection.complete, connection.keep_alive = True, False  # no body follows; do not reuse
        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=_ResponseStream(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/" + connection.parser.get_http_version().encode()},
        )

    async def _connection(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        """An idle connection to ``origin``, else a new one once there is room for it."""
        loop = asyncio.get_running_loop()
        timeout = timeouts.get("pool")
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            connection = self._take_idle(origin)
            if connection is not None:
                return connection
            if self._max_connections is None or self._open < self._max_connections:
                break
            victim = next((c for conns in self._idle.values() for c in conns), None)
            if victim is not None:  # an idle connection elsewhere makes way for this one
                self._idle[victim.origin].remove(victim)
                self._discard(victim)
                continue
            await self._wait_for_room(deadline, timeout)
        self._open += 1
        try:
            return await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._open -= 1
            self._wake_room_waiter()
            raise

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have timed out
            fresh = self._keepalive is None or now - connection.idle_since < self._keepalive
            if not connection.closed and connection.error is None and fresh:
                return connection
            self._discard(connection)
        return None

    async def _wait_for_room(self, deadline: float | None, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_room_waiter()  # woken, but leaving: the room goes to the next one
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no free connection within {timeout:g}s") from exc
            raise
        finally:
            if waiter in self._room_waiters:
                self._room_waiters.remove(waiter)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin), host, port, ssl=context
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {timeout:g}s") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        return connection

    def _wake_room_waiter(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _give_back(self, connection: _Connection, *, reusable: bool) -> None:
        connection.in_flight = False
        if not reusable or connection.closed or self._closed:
            connection.close()
            self._discard(connection)
            return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= (self._max_idle if self._max_idle is not None else len(idle) + 1):
            connection.close()
            self._discard(connection)
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)
        self._wake_room_waiter()

    def _discard(self, connection: _Connection) -> None:
        """Stop counting a connection that will not be used again (exactly once per connection)."""
        if not connection.discarded:
            connection.discarded = True
            connection.close()
            self._open -= 1
            self._wake_room_waiter()

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                self._discard(connection)
        self._idle.clear()


class _Streamed(bytes):
    """Marks a request body that came from a stream: it cannot be sent a second time."""


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


async def _request_body(request: httpx.Request) -> bytes:
    try:
        return request.content
    except httpx.RequestNotRead:
        pass
    chunks = [chunk async for chunk in request.stream]  # type: ignore[union-attr]
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        framed = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks if chunk]
        return _Streamed(b"".join(framed) + b"0\r\n\r\n")
    return _Streamed(b"".join(chunks))
