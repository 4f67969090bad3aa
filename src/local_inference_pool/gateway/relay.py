"""Hand a backend's answer to the client, and read its usage on the way.

What it guarantees, from the moment it owns the lease:
- the lease is released exactly once on every exit: a normal end, a client that leaves (ASGI 2.3
  ``receive`` or 2.4 ``send`` raising), an upstream that fails, cancellation of the request task, an
  error while handing the answer over; the upstream response is closed on each (shielded, bounded),
  so the backend sees the connection close and stops generating;
- a non-streaming answer up to ``SMALL_ANSWER`` bytes is read whole, the slot freed, and sent in one
  message; a backend that dies midway then gets a clean 502, not a cut-off body;
- anything else is relayed byte for byte as it arrives, with no queue in between, so backpressure
  reaches the backend. An upstream failure after the headers went out ends an event stream with the
  route's error event (the status can no longer change) and cuts a JSON body off, so the client sees
  a broken response rather than a truncated one that parses;
- a client that stops reading for ``send_timeout`` seconds is given up on (one check every half
  timeout, not a timer per chunk);
- a stored response's id is remembered with its backend before the client has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import cast

import anyio
import httpx
from starlette.types import Send

from local_inference_pool.gateway.client_watch import ClientWatch
from local_inference_pool.gateway.failover import Recorder, SeamDiverged, StreamSeam
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.model_echo import ModelEcho
from local_inference_pool.gateway.refusals import client_gone, send_upstream_refusal
from local_inference_pool.gateway.runtime import RESPONSE_ID, Call, Runtime, Target
from local_inference_pool.gateway.usage import UsageSniffer, count, prompt_report
from local_inference_pool.pool.leases import Lease
from local_inference_pool.upstream.backends.openai import describe_http_error

__all__ = [
    "GATEWAY_STATUSES",
    "HOP_BY_HOP",
    "SMALL_ANSWER",
    "AnswerBroke",
    "DrainEnded",
    "UpstreamRelay",
    "client_headers",
    "close_unread",
    "continue_stream",
    "end_stream",
    "raw_chunks",
    "relay_answer",
]

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
    }
)
CLOSE_UPSTREAM_SECONDS = 2.0
GATEWAY_STATUSES = frozenset({502, 503, 504})  # the backend's own trouble, whatever the request
SMALL_ANSWER = 1 << 20


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "backend_error"


def client_headers(upstream: httpx.Response, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's headers a client may see, then the pool's own: no hop-by-hop ones (RFC 9110
    §7.6.1: the fixed set and any named in ``Connection``), no length (the pool frames the answer),
    none the pool sets itself."""
    headers = [(name.lower(), value) for name, value in upstream.headers.raw]
    dropped: frozenset[bytes] | set[bytes] = HOP_BY_HOP
    dropped = dropped | {name for name, _ in extra}  # the pool's own say (a key's limits), not the backend's
    for name, value in headers:
        if name == b"connection":
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [h for h in headers if h[0] not in dropped] + extra


def learn(lease: Target, usage: UsageSniffer, record: RequestRecord) -> None:
    """Tell the pool what the backend said of the request's prompt (its cache, its prefill time)."""
    report = prompt_report(usage.usage, usage.timings)
    if report is not None:
        record.cached_tokens = report.cached_tokens
        if record.prompt_tokens is None:  # llama.cpp's stream says it in its timings only
            record.prompt_tokens = report.prompt_tokens
    if record.completion_tokens is None and usage.timings is not None:
        record.completion_tokens = count(usage.timings.get("predicted_n"))
    if report is not None and isinstance(lease, Lease):
        lease.learn(
            prompt_tokens=report.prompt_tokens,
            cached_tokens=report.cached_tokens,
            prefill_seconds=report.prefill_seconds,
            evaluated_tokens=report.evaluated_tokens,
        )


async def relay_answer(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    response: httpx.Response,
    lease: Target,
    record: RequestRecord,
    call: Call,
    prefetched: list[bytes],
    *,
    recorder: Recorder | None = None,
    rerun: bool = False,
) -> UpstreamRelay | None:
    """Hand the upstream answer to the client; from here on it owns the lease. ``prefetched``: the
    answer's first chunks, already read. With a ``recorder``, a stream keeps what it relayed, and a
    backend that fails midway leaves the stream open (``interrupted``) for the proxy to continue
    elsewhere; the relay that ran is returned. With ``rerun``, a plain answer that breaks before
    it is whole (nothing was sent) raises ``AnswerBroke`` (the slot given back) for the proxy to
    send the request elsewhere."""
    try:  # until the answer owns the lease, a failure here must still give it back
        backend = lease.backend
        record.queue_wait = lease.queue_wait
        extra = [
            (b"x-backend", backend.encode()),
            (b"x-queue-wait-ms", f"{lease.queue_wait * 1000:.1f}".encode()),
            (b"x-request-id", record.request_id.encode()),
        ]
        if lease.affinity is not None:
            extra.append((b"x-session-affinity", lease.affinity.value.encode()))
            record.affinity = lease.affinity.value
        extra += record.headers  # the key's rate-limit standing (the backend's own are dropped)
        if response.status_code in GATEWAY_STATUSES:
            runtime.monitor.failed(backend, f"answered {response.status_code}")
        else:
            # Any other answer, a 500 included, says the server is up and answering. A 500 is often
            # the request's own fault (llama.cpp answers 500 to a body it cannot handle): counted
            # against the backend, one client could open its circuit for everyone.
            runtime.monitor.succeeded(backend)
        relay: UpstreamRelay | None = None
        headers = client_headers(response, extra)
        chunks = _after(prefetched, raw_chunks(response)) if prefetched else raw_chunks(response)
        chunks = echoing(chunks, record)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        length = response.headers.get("content-length", "")
        if streamed or (length.isdigit() and int(length) > SMALL_ANSWER):
            relay = UpstreamRelay(
                response,
                lease,
                headers,
                chunks,
                runtime=runtime,
                record=record,
                call=call,
                recorder=recorder if streamed and response.status_code == 200 else None,
            )
    except BaseException:
        await close_unread(response, lease)
        raise
    if relay is None:
        relay = await _answer_whole(
            watch, send, response, lease, headers, chunks, record, runtime, call, rerun
        )
    if relay is not None:
        await relay(watch, send)
    return relay


async def continue_stream(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    response: httpx.Response,
    lease: Target,
    record: RequestRecord,
    call: Call,
    recorder: Recorder,
    seam: StreamSeam,
) -> UpstreamRelay:
    """Relay a continuation into the client's stream, which is already open: through the ``seam``,
    and recorded with what the client got before (for another continuation if this one fails too)."""
    try:
        runtime.monitor.succeeded(lease.backend)
        relay = UpstreamRelay(
            response,
            lease,
            [],
            echoing(raw_chunks(response), record),
            runtime=runtime,
            record=record,
            call=call,
            recorder=recorder,
            seam=seam,
        )
    except BaseException:
        await close_unread(response, lease)
        raise
    await relay(watch, send)
    return relay


class DrainEnded(Exception):
    """The drain of a request's backend ran out (``drain_timeout``): its request was cut there."""

    def __init__(self, backend: str) -> None:
        super().__init__(f"the backend {backend} was drained (its drain_timeout passed)")


class AnswerBroke(Exception):
    """A plain answer broke off before any of it reached the client: it may be asked again elsewhere."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend}: died mid-response: {reason}")
        self.backend = backend
        self.message = f"the backend {backend} failed during the response: {reason}"


async def end_stream(
    send: Send, event: bytes | None, record: RequestRecord, runtime: Runtime, outcome: str
) -> None:
    """End a stream the proxy held open after its backend failed: with ``event`` (an error event)
    or cleanly, and report the request once."""
    record.outcome = outcome
    try:
        await send({"type": "http.response.body", "body": event or b"", "more_body": False})
    except OSError:
        logger.debug("client left before its stream's end")
    runtime.finish(record)


async def close_unread(response: httpx.Response, lease: Target) -> None:
    """Close the upstream answer unread (the backend sees its connection close) and free the slot;
    the closing is shielded from cancellation and bounded, so the slot is freed whatever happens."""
    try:
        with anyio.move_on_after(CLOSE_UPSTREAM_SECONDS, shield=True):
            await response.aclose()
    finally:
        lease.release()


async def _answer_whole(
    watch: ClientWatch,
    send: Send,
    response: httpx.Response,
    lease: Target,
    headers: list[tuple[bytes, bytes]],
    chunks: AsyncIterator[bytes],
    record: RequestRecord,
    runtime: Runtime,
    call: Call,
    rerun: bool,
) -> UpstreamRelay | None:
    """Read a plain answer and send it in one message, the slot freed first: no streaming machinery.

    Reading it first also means a backend that dies midway gets a clean 502, not a cut-off body. An
    answer that turns out larger than ``SMALL_ANSWER`` is relayed instead (the relay is returned).
    """
    body: list[bytes] = []
    size = 0
    read_all = False
    try:
        async with watch.until_gone():
            async for chunk in chunks:
                body.append(chunk)
                size += len(chunk)
                if size > SMALL_ANSWER:
                    return UpstreamRelay(
                        response,
                        lease,
                        headers,
                        _after(body, chunks),
                        runtime=runtime,
                        record=record,
                        call=call,
                    )
            read_all = True
    except httpx.HTTPError as exc:
        await close_unread(response, lease)
        reason = describe_http_error(exc)
        runtime.monitor.failed(lease.backend, f"died mid-response: {reason}")
        if rerun:
            raise AnswerBroke(lease.backend, reason) from None
        record.outcome = "failed_midway"
        message = f"the backend {lease.backend} failed during the response: {reason}"
        await send_upstream_refusal(send, call.dialect, 502, message, "upstream_failed", record, runtime)
        return None
    except BaseException:
        await close_unread(response, lease)
        raise
    try:
        await response.aclose()  # read to the end: this only hands the connection back
    finally:
        lease.release()
    if not read_all:  # the client left while the answer was read
        client_gone(record, runtime)
        return None
    whole = body[0] if len(body) == 1 else b"".join(body)
    record.first_byte = time.monotonic() - record.started
    if record.capture is not None:
        record.capture.add_response(whole)
    usage = UsageSniffer(event_stream=False, want_id=call.route.remembers_response)
    usage.feed(whole)
    usage.finish()
    record.take_usage(usage.usage)
    record.finish_reasons = usage.finish_reasons
    learn(lease, usage, record)
    if usage.response_id is not None and response.status_code < 300:
        await _remember(runtime, usage.response_id, lease.backend)  # before the client can name it
    record.status, record.outcome = response.status_code, outcome_of(response.status_code)
    runtime.finish(record)
    headers.append((b"content-length", str(len(whole)).encode()))
    try:
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": whole})
    except OSError:
        logger.debug("client left before the answer from %s was sent", lease.backend)
    return None


async def _remember(runtime: Runtime, response_id: str, backend: str) -> None:
    """Note which backend stores a response, if its id is one the pool may keep (a backend's id is
    input like any other: bounded, no spaces or control characters)."""
    if RESPONSE_ID.fullmatch(response_id):
        await runtime.responses.remember(response_id, backend)


def raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The bytes as the backend sent them (identity encoding was asked for; anything else passes on)."""
    return cast(httpx.AsyncByteStream, response.stream).__aiter__()


def echoing(chunks: AsyncIterator[bytes], record: RequestRecord) -> AsyncIterator[bytes]:
    """The answer's chunks naming the model the client asked for, when the backend knows it by
    another name (an alias served it, or ``serve_as`` gave the server's own id)."""
    served, asked = record.upstream_model or record.model, record.asked or record.model
    return chunks if served == asked else _echoed(chunks, ModelEcho(served, asked))


async def _echoed(chunks: AsyncIterator[bytes], echo: ModelEcho) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if data := echo.feed(chunk):
            yield data
    if tail := echo.flush():
        yield tail


async def _after(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


class UpstreamRelay:
    """Relays one upstream answer as it arrives; owns the lease and the upstream response."""

    def __init__(
        self,
        upstream: httpx.Response,
        lease: Target,
        headers: list[tuple[bytes, bytes]],
        chunks: AsyncIterator[bytes],
        *,
        runtime: Runtime,
        record: RequestRecord,
        call: Call,
        recorder: Recorder | None = None,
        seam: StreamSeam | None = None,
    ) -> None:
        self.upstream = upstream
        self.lease = lease
        self.runtime = runtime
        self.record = record
        self.dialect = call.dialect
        self.recorder = recorder  # what the client got, kept to continue the stream elsewhere
        self.seam = seam  # set on a continuation: its chunks are rewritten into the client's stream
        self.interrupted: str | None = None  # why the backend failed midway, when left to the proxy
        self.failed_at: float | None = None
        self.diverged = False  # a replayed continuation went another way: nothing of it was sent
        self.first_sent_at: float | None = None
        self._remembers = call.route.remembers_response and upstream.status_code < 300
        self.is_event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
        if self.is_event_stream:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.headers = headers
        self._usage = UsageSniffer(self.is_event_stream, want_id=self._remembers)
        self._relayed_all = False
        self._too_slow = False
        self._sending_since: float | None = None
        self._chunks = chunks

    async def __call__(self, watch: ClientWatch, send: Send) -> None:
        timeout = self.runtime.config.send_timeout
        try:
            if timeout is not None:
                watch.watch_sending(lambda: self._sending_since, timeout)
            async with watch.until_gone():
                await self._relay(send)
        finally:
            watch.stop_watching_sends()
            self._too_slow = watch.too_slow
            if self._too_slow:
                logger.info(
                    "client stopped reading the response from %s for %ss: gave up",
                    self.lease.backend,
                    self.runtime.config.send_timeout,
                )
            with anyio.move_on_after(CLOSE_UPSTREAM_SECONDS, shield=True):
                aclose = getattr(self._chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.upstream.aclose()  # the backend sees the connection close and stops
            self.lease.release()
            if self.interrupted is None:
                self._report()  # else the proxy reports, once the stream ends somewhere

    async def _relay(self, send: Send) -> None:
        chunks = self._chunks
        recorder, seam = self.recorder, self.seam
        try:
            if seam is None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.upstream.status_code,
                        "headers": self.headers,
                    }
                )
            with self.lease.cuttable() as cut:
                finished = await self._relay_chunks(send, chunks, recorder, seam)
            if cut.cancelled_caught:  # the backend's drain ended: as if it had died here
                await self._upstream_failed(send, DrainEnded(self.lease.backend), counts=False)
                return
            if not finished:
                return
            self._relayed_all = True
            self.runtime.accounting.expecting(self.record)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 reports a client that left as a failed send; leaving is not an error
            logger.debug("client left during the response from %s", self.lease.backend)

    async def _relay_chunks(
        self,
        send: Send,
        chunks: AsyncIterator[bytes],
        recorder: Recorder | None,
        seam: StreamSeam | None,
    ) -> bool:
        """Relay the answer's chunks; whether they all came (not when the backend failed midway)."""
        record = self.record
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return True
            except Exception as exc:  # any transport's read error: the status is already sent
                await self._upstream_failed(send, exc)
                return False
            if seam is not None:
                try:
                    chunk = seam.feed(chunk)
                except SeamDiverged as diverged:
                    self.interrupted, self.diverged = str(diverged), True
                    return False  # the proxy continues the stream another way
                if not chunk:
                    continue
                if self.first_sent_at is None:
                    self.first_sent_at = time.monotonic()
            if recorder is not None:
                recorder.feed(chunk)
            if record.first_byte is None:
                record.first_byte = time.monotonic() - record.started
            self._usage.feed(chunk)
            if self.is_event_stream:  # about a token an event: the charts' live rate
                events = chunk.count(b"data:")
                record.streamed_tokens += events
                self.runtime.traffic.streamed(self.lease.backend, record.model, events)
            if record.capture is not None:
                record.capture.add_response(chunk)
            if self._remembers and self._usage.response_id is not None:
                self._remembers = False  # once, before the client has the id
                await _remember(self.runtime, self._usage.response_id, self.lease.backend)
            self._sending_since = time.monotonic()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._sending_since = None

    async def _upstream_failed(self, send: Send, exc: Exception, *, counts: bool = True) -> None:
        """The backend failed midway (``counts``: against its circuit; a drain's end does not)."""
        reason = f"{exc or type(exc).__name__}"
        logger.warning("backend %s failed mid-response: %s", self.lease.backend, reason)
        if counts:
            self.runtime.monitor.failed(self.lease.backend, f"died mid-response: {reason}")
        if self.recorder is not None and not self.recorder.overflow:
            self.interrupted, self.failed_at = reason, time.monotonic()
            return  # the stream stays open: the proxy may continue it on another backend
        self.record.outcome = "failed_midway"
        if not self.is_event_stream:
            return  # ending without the final message: the client's connection is cut, not completed
        message = f"the backend {self.lease.backend} failed during the response: {reason}"
        event = self.dialect.stream_error(message, "upstream_failed")
        await send({"type": "http.response.body", "body": event, "more_body": False})

    def _report(self) -> None:
        record = self.record
        record.status = self.upstream.status_code
        self._usage.finish()
        record.take_usage(self._usage.usage)
        record.finish_reasons = self._usage.finish_reasons
        learn(self.lease, self._usage, record)
        if self._too_slow:
            record.outcome = "client_too_slow"
        elif record.outcome == "ok":
            record.outcome = outcome_of(record.status) if self._relayed_all else "client_gone"
        self.runtime.finish(record)
