"""Bounds on what a client may send before the pool's app sees it, for the server ``serve`` runs.

uvicorn's httptools parser buffers a header of any size and waits forever for an unfinished head
(measured: 4 connections with unfinished 32 MiB headers took the gateway from 42 to 213 MB). This
subclass of uvicorn's own httptools protocol adds what it lacks, and nothing else:

- a request head (request line and headers) over ``max_header_size`` bytes, or with more than
  ``max_headers`` fields, is answered 431 and the connection closed;
- a connection that has not finished its request head ``header_timeout`` seconds after it opened,
  or after a later request's head began, is answered 408 and closed (idle keep-alive connections
  between requests are uvicorn's ``timeout_keep_alive``; a slow body is the app's ``body_timeout``).
  The clock of a later head is started only when a read leaves that head unfinished: most heads
  arrive whole in one read, and a timer armed and cancelled for each of them is work for nothing.

Parsing stays httptools' (uvicorn's faster parser, which ``serve`` has always used): h11, uvicorn's
other one, bounds the size of a head (``h11_max_incomplete_event_size``) but neither its field count
nor its time, so it would need the same additions. The bounds cost nothing measurable:
``bench/server_limits.py`` gives 0.976-0.999x of the plain protocol's requests/s at c=32.

Also here: a log filter that tells uvicorn's "ASGI callable returned without completing response"
for what it is in this app. The pool returns without completing a response only when its client
left or stopped reading (``send_timeout``), which is the client's doing, not a server error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from local_inference_pool.config import PoolConfig

__all__ = ["CancelledAtShutdownFilter", "ClientLeftFilter", "bounded_protocol"]

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_header_size: ClassVar[int] = 32 * 1024
    max_headers: ClassVar[int] = 100
    header_timeout: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_fields = 0
        self._head_size = 0  # the current head, measured field by field
        self._head_begun = False  # a request's head has begun and is not finished
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # An unfinished head is counted in raw bytes, before the feed and judged after it (a chunk
        # may finish the head and carry a large body too); what httptools holds of it stays under
        # the limit plus one read. A finished head is measured exactly, field by field.
        if self._in_head:
            self._head_bytes += len(data)
        self._feed(data)
        if self._in_head and self._head_bytes > self.max_header_size:
            self._refuse(431, f"the request head is larger than {self.max_header_size} bytes")
        elif self._head_begun and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()  # this read left a head unfinished: its clock starts

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _HeadTooLarge):
                raise
            self._refuse(431, str(exc.__context__))
        except httptools.HttpParserError:
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_fields = 0
        self._head_size = 0
        self._head_begun = True

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.max_headers:
            raise _HeadTooLarge(f"the request has more than {self.max_headers} header fields")
        self._grow_head(len(name) + len(value) + 4)  # with ": " and the line's end
        super().on_header(name, value)

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.max_header_size:
            raise _HeadTooLarge(f"the request head is larger than {self.max_header_size} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: the next head's clock starts after it
        if self._head_begun or self._head_bytes or self.cycle is None:
            self._refuse(408, f"the request head did not arrive within {self.header_timeout:g}s")

    def _refuse(self, status: int, message: str) -> None:
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


def bounded_protocol(config: PoolConfig) -> type[BoundedHttpToolsProtocol]:
    """uvicorn's httptools protocol with ``config``'s head limits (pass it as ``uvicorn.Config(http=...)``)."""
    return type(
        "PoolHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "max_header_size": config.max_header_size,
            "max_headers": config.max_headers,
            "header_timeout": config.header_timeout,
        },
    )


class ClientLeftFilter(logging.Filter):
    """Logs uvicorn's unfinished-response error at INFO: in the pool it means the client left."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith(
            "ASGI callable returned without completing response"
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "the client left before its response was complete", None
        return True


class CancelledAtShutdownFilter(logging.Filter):
    """uvicorn logs a request it cancels when the shutdown grace runs out as an exception with a
    traceback. In the pool that is the end of the grace, not a fault (the request's slot is released
    on cancellation): one INFO line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError) and record.getMessage().startswith(
            "Exception in ASGI application"
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = (
                "a request still running when the shutdown grace ran out was ended",
                None,
            )
            record.exc_info, record.exc_text = None, None
        return True
