"""The shared client's transport: upstream HTTP on one ``aiohttp.ClientSession``, behind httpx's interface.

Why aiohttp: it is a well-kept HTTP client that gets the hard parts right (1xx interim answers are
skipped, 101 is reported, answers split anywhere, chunked and close-delimited bodies, bounded
response heads, a reused keep-alive connection that closed is retried for idempotent methods only,
never for a POST). Why httpx's interface over it: the rest of the pool, the probes and the tests
speak ``httpx.AsyncClient``, and ``httpx.MockTransport`` stays a drop-in for tests.

What the session is set to, and why:
- no cookies kept (``DummyCookieJar``), no redirects followed, no proxy variables read, no body
  decompression: a proxy passes bytes, and one client's cookies must never reach another's request;
- response heads bounded: lines and fields at ``MAX_HEAD_FIELD`` bytes, at most ``MAX_HEAD_FIELDS``
  fields (aiohttp's parser limits), so a backend cannot make the pool hold a 64 MiB header;
- bodies stream with backpressure: aiohttp stops reading the socket past ``2 x READ_BUFFER``
  unread bytes, so a slow client slows the backend, never memory;
- connections are limited from the fleet's slots and idle ones dropped before the servers' 5 s.

Errors are httpx's own, chosen so the proxy can classify the failure (see ``proxy.py``):

============================================  ===========================  =======================
aiohttp                                       httpx                        means
============================================  ===========================  =======================
ClientConnectorError (refused, DNS, TLS)      ConnectError                 not connected
ConnectionTimeoutError while connecting       ConnectTimeout               not connected
ConnectionTimeoutError waiting for the pool   PoolTimeout                  local limit
SocketTimeoutError                            ReadTimeout                  reached, too slow
ServerDisconnectedError, ClientOSError        RemoteProtocolError          written, no answer
ClientResponseError (not HTTP, head too big)  RemoteProtocolError          written, no answer
101 Switching Protocols                       RemoteProtocolError          written, no answer
ClientPayloadError, errors while reading      ReadError                    died mid-answer
============================================  ===========================  =======================
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import httpx

__all__ = ["MAX_HEAD_FIELD", "MAX_HEAD_FIELDS", "AiohttpTransport"]

MAX_HEAD_FIELD: Final = 16 * 1024  # bytes in the status line or one header of a backend's answer
MAX_HEAD_FIELDS: Final = 100
READ_BUFFER: Final = 128 * 1024


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` over one aiohttp session, made on first use in the running loop."""

    def __init__(self, limits: httpx.Limits, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._holding = 0  # requests that hold a connection: sent, their answer not yet closed
        self._timeouts: dict[int, tuple[object, aiohttp.ClientTimeout]] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 4.0,
                ssl=self._ssl,
            )
            # No trace configs: aiohttp awaits every trace signal of every request, a measured 35 µs
            # of CPU per request (14% of the transport's); whether a request waited for a
            # connection is known from the count of requests holding one (``_holding``).
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                read_bufsize=READ_BUFFER,
                max_line_size=MAX_HEAD_FIELD,
                max_field_size=MAX_HEAD_FIELD,
                max_headers=MAX_HEAD_FIELDS,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        timeouts = request.extensions.get("timeout", {})
        timeout = self._timeouts.get(id(timeouts))
        if timeout is None or timeout[0] is not timeouts:
            timeout = self._timeout_for(timeouts)
        try:
            body: bytes | None = request.content or None
        except httpx.RequestNotRead:
            body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        limit = self._limits.max_connections
        queued = limit is not None and self._holding >= limit  # every connection is held: it waits
        self._holding += 1
        try:
            response = await self._open().request(
                request.method,
                str(request.url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=body,
                allow_redirects=False,
                compress=None,
                timeout=timeout[1],
            )
        except aiohttp.ClientError as exc:
            self._holding -= 1
            mapped = _as_httpx(exc, request, queued)
            if mapped is None:
                raise
            raise mapped from exc
        except BaseException:
            self._holding -= 1
            raise
        if response.status == 101:
            self._holding -= 1
            response.close()
            raise httpx.RemoteProtocolError(
                "the server switched protocols, which a proxy cannot relay", request=request
            )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request, self),
            request=request,
            extensions={"http_version": _version(response.version)},
        )

    def _timeout_for(self, timeouts: dict[str, float | None]) -> tuple[object, aiohttp.ClientTimeout]:
        """aiohttp's timeouts for httpx's, made once per dict of timeouts (the pool keeps one)."""
        if len(self._timeouts) >= 16:
            self._timeouts.clear()
        made = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),  # aiohttp's "connect" is the wait for a connection, pool included
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        self._timeouts[id(timeouts)] = (timeouts, made)
        return timeouts, made

    def released(self) -> None:
        """An answer's connection was handed back (or closed)."""
        self._holding -= 1

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


class _Body(httpx.AsyncByteStream):
    """The answer's bytes as they arrive (``iter_any``: whatever the socket gave, never held back)."""

    def __init__(
        self, response: aiohttp.ClientResponse, request: httpx.Request, owner: AiohttpTransport
    ) -> None:
        self._response = response
        self._request = request
        self._owner: AiohttpTransport | None = owner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            mapped = _as_httpx(exc, self._request, False)
            if mapped is None:
                raise
            raise mapped from exc
        self._released()  # aiohttp hands the connection back at the answer's end

    def _released(self) -> None:
        if self._owner is not None:
            self._owner.released()
            self._owner = None

    async def aclose(self) -> None:
        # Read to the end: the connection may be reused. Otherwise close it, so the backend sees the
        # client leave and stops generating.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()
        self._released()


def _as_httpx(exc: aiohttp.ClientError, request: httpx.Request, queued: bool) -> Exception | None:
    """aiohttp's error as httpx's, per the table in the module docstring; ``queued``: the request
    had to wait for a connection, so a connection timeout is the pool's own limit. (A function and
    a ``try`` where it is needed, not a context manager: that cost a generator per request.)"""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        if queued:
            return httpx.PoolTimeout("no free upstream connection in time", request=request)
        return httpx.ConnectTimeout(f"connecting took too long: {exc}", request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout("the server sent nothing within the read timeout", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(
            f"cannot connect to {exc.host}:{exc.port}: {exc.strerror or exc}", request=request
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionResetError):
        return httpx.ReadError(f"the answer broke off: {_reason(exc)}", request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("the server disconnected without an answer", request=request)
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(
            f"the server's answer is not valid HTTP: {exc.message}", request=request
        )
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.RemoteProtocolError(f"the connection failed: {_reason(exc)}", request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(f"not a URL the pool can reach: {exc}", request=request)
    return None  # not one of the table's: raised as it is


def _version(version: aiohttp.HttpVersion | None) -> bytes:
    return b"HTTP/1.1" if version is None else f"HTTP/{version.major}.{version.minor}".encode()


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (str(cause) if cause else type(exc).__name__)
