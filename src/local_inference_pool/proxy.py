"""Forward one request to the backend a lease names, and relay the answer without buffering it.

``UpstreamResponse`` differs from Starlette's ``StreamingResponse`` on purpose:
- it owns the lease and the upstream response: its ``__call__`` wraps the parent's in ``try/finally``
  so the upstream is closed (shielded, bounded) and the lease released exactly once on every exit:
  the end of the body, a client disconnect (ASGI 2.3 ``receive`` race or 2.4 ``send`` raising), an
  upstream read error, cancellation of the request task, or shutdown;
- an upstream failure after the headers went out becomes a final SSE ``data: {"error": ...}`` event
  for event streams (the status can no longer change); a JSON body is cut off instead, so that the
  client sees a broken response rather than a truncated one that parses;
- it relays the upstream's bytes as they come (``aiter_bytes``: byte for byte with the identity
  encoding the proxy asks for, decoded if a backend compresses anyway, since ``content-encoding`` is
  not passed on); there is no queue between upstream and client, so backpressure reaches the backend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping

import anyio
import httpx
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from local_inference_pool.metrics import PoolMetrics, RequestRecord, UsageSniffer
from local_inference_pool.pool import Lease

__all__ = ["HOP_BY_HOP", "UpstreamResponse", "upstream_headers"]

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
    }
)
CLOSE_UPSTREAM_SECONDS = 2.0


def client_headers(upstream: httpx.Response, extra: Mapping[str, str]) -> dict[str, str]:
    """The backend's headers a client may see (no hop-by-hop, no length or encoding), plus ours."""
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.update(extra)
    return headers


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "backend_error"


def upstream_headers(lease: Lease, request_id: str | None) -> dict[str, str]:
    """What the backend gets: JSON, no compression, its own key. Never the client's credentials."""
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    if lease.api_key:
        headers["authorization"] = f"Bearer {lease.api_key}"
    if request_id:
        headers["x-request-id"] = request_id
    return headers


class UpstreamResponse(StreamingResponse):
    def __init__(
        self,
        upstream: httpx.Response,
        lease: Lease,
        extra_headers: Mapping[str, str],
        *,
        on_failure: Callable[[str], None] | None = None,
        record: RequestRecord | None = None,
        metrics: PoolMetrics | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.lease = lease
        self.on_failure = on_failure
        self.record = record
        self.metrics = metrics
        self.send_timeout = send_timeout
        self._relayed_all = False
        self._too_slow = False
        content_type = upstream.headers.get("content-type", "application/json")
        self.is_event_stream = content_type.startswith("text/event-stream")
        headers = client_headers(upstream, extra_headers)
        if self.is_event_stream:
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"
        self._relay_iterator = self._relay()
        self._usage = UsageSniffer(self.is_event_stream)
        super().__init__(self._relay_iterator, status_code=upstream.status_code, headers=headers)

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        record = self.record
        try:
            async for chunk in self.upstream.aiter_bytes():
                if record is not None and record.first_byte is None:
                    record.first_byte = time.monotonic() - record.started
                self._usage.feed(chunk)
                yield chunk
            self._relayed_all = True
        except Exception as exc:  # any transport's read error: the status is already sent
            logger.warning(
                "backend %s failed mid-response: %s", self.lease.backend, exc or type(exc).__name__
            )
            if self.on_failure is not None:
                self.on_failure(f"died mid-response: {exc or type(exc).__name__}")
            if record is not None:
                record.outcome = "failed_midway"
            if not self.is_event_stream:
                raise
            error = {
                "error": {
                    "message": f"the backend {self.lease.backend} failed during the response: "
                    f"{exc or type(exc).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_failed",
                }
            }
            yield b"data: " + json.dumps(error).encode() + b"\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.send_timeout
        sending_since: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal sending_since
            sending_since = time.monotonic()
            await send(message)
            sending_since = None

        async def watchdog(scope_to_cancel: anyio.CancelScope) -> None:
            # A client that stops reading fills the socket and blocks a send forever: one check every
            # half timeout (not a timer per chunk) frees the slot and stops the backend.
            assert timeout is not None
            while True:
                await anyio.sleep(timeout / 2)
                if sending_since is not None and time.monotonic() - sending_since > timeout:
                    self._too_slow = True
                    scope_to_cancel.cancel()

        try:
            if timeout is None:
                await self._respond(scope, receive, send)
            else:
                async with anyio.create_task_group() as group:
                    group.start_soon(watchdog, group.cancel_scope)
                    await self._respond(scope, receive, timed_send)
                    group.cancel_scope.cancel()
        finally:
            if self._too_slow:
                logger.warning(
                    "client stopped reading the response from %s for %ss: gave up",
                    self.lease.backend,
                    timeout,
                )
                if self.record is not None:
                    self.record.outcome = "client_too_slow"
            with anyio.move_on_after(CLOSE_UPSTREAM_SECONDS, shield=True):
                await self._relay_iterator.aclose()
                await self.upstream.aclose()  # the backend sees the connection close and stops
            self.lease.release()
            self._report()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            # ASGI 2.4 reports a client that left as a failed send; leaving is not an error.
            logger.debug("client left during the response from %s", self.lease.backend)

    def _report(self) -> None:
        record = self.record
        if record is None or self.metrics is None:
            return
        record.status = self.status_code
        self._usage.finish()
        record.take_usage(self._usage.usage)
        if record.outcome == "ok":
            record.outcome = outcome_of(self.status_code) if self._relayed_all else "client_gone"
        self.metrics.observe(record)
