"""Forward one request to a backend the pool chose, and answer the client with what comes back.

The hot path of the gateway, in raw ASGI. What it guarantees:
- the lease is released exactly once on every exit: a normal end, a client that leaves (ASGI 2.3
  ``receive`` or 2.4 ``send`` raising), an upstream that fails, cancellation of the request task, an
  error while handing the answer over; the upstream response is closed on each (shielded, bounded),
  so the backend sees the connection close and stops generating;
- before any answer reached the client, a backend that cannot be reached is taken out and the
  request goes to another (at most ``MAX_ATTEMPTS`` backends); a backend's own 4xx/5xx passes through;
- a non-streaming answer up to ``SMALL_ANSWER`` bytes is read whole, the slot freed, and sent in one
  message; a backend that dies midway then gets a clean 502, not a cut-off body;
- anything else is relayed byte for byte as it arrives, with no queue in between, so backpressure
  reaches the backend. An upstream failure after the headers went out ends an event stream with a
  final SSE ``data: {"error": ...}`` event (the status can no longer change) and cuts a JSON body
  off, so the client sees a broken response rather than a truncated one that parses;
- a client that leaves ends the work done for it wherever it is: queued (its place is freed), while
  the backend works on the answer, streamed or not (the upstream connection is closed, so the backend
  stops), or mid-relay; a client that stops reading for ``send_timeout`` seconds is given up on (one
  check every half timeout, not a timer per chunk).

Requests go through the shared client's transport directly: a proxy must not keep one client's
cookies for the next, follows no redirects and adds no auth, which is all ``AsyncClient.send`` adds,
at a measured 170 µs per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Send

from local_inference_pool.backends.openai import describe_http_error
from local_inference_pool.config import PoolConfig
from local_inference_pool.dialects import Dialect
from local_inference_pool.errors import NoCapacityError, PoolError
from local_inference_pool.health import Monitor
from local_inference_pool.inbound import Inbound
from local_inference_pool.metrics import PoolMetrics, RequestRecord, UsageSniffer
from local_inference_pool.pool import Lease, Pool, Unleased
from local_inference_pool.routes import RouteSpec, RouteSupport

__all__ = ["HOP_BY_HOP", "Call", "Runtime", "UpstreamRelay", "forward", "refuse"]

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
MAX_ATTEMPTS = 3  # the first backend and up to two others after a connection failure
SMALL_ANSWER = 1 << 20
RESPONSE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")  # ids the pool remembers and looks up
LACKING_BODY = 4096  # of a 404 answer, read to tell a missing route from a missing model
PASSED_HEADERS = (b"anthropic-version", b"anthropic-beta")  # the API's version, not a credential
_URL_CACHE_SIZE = 1024
WATCH_AFTER = 0.05  # seconds a wait lasts before the client's connection is watched


@dataclass
class Runtime:
    """What the lifespan made, shared by every request of one pool app."""

    config: PoolConfig
    pool: Pool
    client: httpx.AsyncClient
    transport: httpx.AsyncBaseTransport  # the client's own: the proxy sends through it
    monitor: Monitor
    metrics: PoolMetrics
    routes: RouteSupport = field(default_factory=RouteSupport)

    def __post_init__(self) -> None:
        self.timeouts = self.client.timeout.as_dict()  # the client's, for requests sent past it
        self._urls: dict[str, httpx.URL] = {}

    def upstream_url(self, base: str, path: str) -> httpx.URL:
        """Parsed once per backend and path, not once per request."""
        key = base + path
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            url = self._urls[key] = httpx.URL(key)
        return url


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "client_error" if status < 500 else "backend_error"


Target = Lease | Unleased  # where a request goes: with a slot, or (tokenize, count_tokens) without


@dataclass(slots=True)
class Call:
    """How one request goes upstream: its route, the backend's path for it, the method, the body's
    type, and the client's headers the backend may see (an API version, never a credential)."""

    route: RouteSpec
    path: str
    method: str = "POST"
    content_type: bytes | None = b"application/json"
    passed: tuple[tuple[bytes, bytes], ...] = ()
    pin: str | None = None  # the one backend that may serve it (it stores the response named)

    @property
    def dialect(self) -> Dialect:
        return self.route.dialect


def upstream_headers(target: Target, request_id: str, call: Call) -> list[tuple[bytes, bytes]]:
    """What the backend gets: the body's type, no compression, its own key. Never the client's
    credentials."""
    headers = [(b"accept-encoding", b"identity"), (b"x-request-id", request_id.encode()), *call.passed]
    if call.content_type is not None:
        headers.append((b"content-type", call.content_type))
    if target.api_key:
        key = target.api_key.encode()
        headers.append((b"authorization", b"Bearer " + key))
        if call.dialect.name == "anthropic":
            headers.append((b"x-api-key", key))  # what servers speaking Anthropic's API may read
    return headers


def client_headers(upstream: httpx.Response, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's headers a client may see, then the pool's own: no hop-by-hop ones (RFC 9110
    §7.6.1: the fixed set and any named in ``Connection``), no length (the pool frames the answer)."""
    headers = [(name.lower(), value) for name, value in upstream.headers.raw]
    dropped: frozenset[bytes] | set[bytes] = HOP_BY_HOP
    for name, value in headers:
        if name == b"connection":
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [h for h in headers if h[0] not in dropped] + extra


class ClientWatch:
    """Whether the client is still there, while the request waits for something that may take long:
    a slot, the backend's answer (abandoning it closes that connection, so the backend stops
    generating), or the relay. A client that leaves ends the wait at once; the caller checks ``gone``.

    A task reads ``receive`` for ``http.disconnect``, but only once a wait has lasted ``WATCH_AFTER``
    seconds: most plain requests are answered sooner, and a task per request cost a sixth of the
    pool's plain-request throughput (measured with wrk at c=32). A wait ends by cancelling the request
    task and taking the cancellation back at the end of the block, as ``asyncio.timeout`` does.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._waits: list[_UntilGone] = []
        self._watcher: asyncio.Task[None] | None = None
        self._start_watcher: asyncio.TimerHandle | None = None

    def until_gone(self) -> _UntilGone:
        return _UntilGone(self)

    def end_waits(self) -> None:
        for wait in self._waits:
            wait.end()

    def close(self) -> None:
        if self._start_watcher is not None:
            self._start_watcher.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _arm(self) -> None:
        if self._watcher is None and self._start_watcher is None:
            loop = asyncio.get_running_loop()
            self._start_watcher = loop.call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self._start_watcher = None
        self._watcher = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.end_waits()


class _UntilGone:
    __slots__ = ("_ended", "_task", "_watch")

    def __init__(self, watch: ClientWatch) -> None:
        self._watch = watch
        self._ended = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        watch = self._watch
        watch._waits.append(self)
        if watch.gone:
            self.end()
        watch._arm()

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._task.cancel()  # delivered at the block's await, which is where the task is

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        self._watch._waits.remove(self)
        if not self._ended:
            return False
        if kind is not asyncio.CancelledError:
            # The block ended without meeting our cancellation (it never suspended): take delivery
            # of it here, or it would strike the next await after the block.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        if self._task.uncancel() > 0:  # somebody else cancelled the task too: theirs goes on
            if kind is not asyncio.CancelledError:
                raise asyncio.CancelledError
            return False
        return kind is asyncio.CancelledError  # ours: the wait is over, the caller checks why


async def forward(
    receive: Receive,
    send: Send,
    runtime: Runtime,
    call: Call,
    inbound: Inbound,
    record: RequestRecord,
) -> None:
    """Queue for a slot (if the route takes one), send the request upstream, answer the client;
    every outcome is answered, and a client that leaves at any point stops the work done for it."""
    watch = ClientWatch(receive)
    try:
        await _forward(watch, send, runtime, call, inbound, record)
    finally:
        watch.close()


def _client_gone(record: RequestRecord, runtime: Runtime) -> None:
    record.status, record.outcome = 499, "client_gone"
    runtime.metrics.observe(record)


async def _forward(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    call: Call,
    inbound: Inbound,
    record: RequestRecord,
) -> None:
    """Every failure before an answer is classified (the table in the README and ``upstream.py``):

    - not connected (refused, DNS, connect timeout): the backend is out until a probe finds it, and
      the request goes to another, up to ``MAX_ATTEMPTS`` backends in all;
    - written, no answer (reset, EOF before headers, not HTTP): counts toward that backend's circuit,
      and the request is sent once more, pinned to another backend; after a second such failure it
      is answered 502 and sent to no third backend, so a request that breaks backends cannot walk
      the fleet;
    - read timeout before headers: 504, counts for nothing (one long prefill is not a fault);
    - the pool's own connection limit: 503, never the backend's fault;
    - a backend that lacks the route (404 or 405 on a route that learns): it is marked so for a
      while and the request goes to another backend of the model; none left, 404.

    A request pinned to the backend that stores its response (``call.pin``) goes nowhere else.
    """
    dialect = call.dialect
    route = call.route
    failures: list[str] = []
    no_answer: list[str] = []  # backends that took the request and gave no answer
    lacking = runtime.routes.lacking(call.path) if route.learns else set()
    tried_lacking: list[str] = []
    pin: str | None = call.pin
    attempts = 0
    while attempts < MAX_ATTEMPTS:
        record.retries = len(failures)
        try:
            target = await _target(watch, runtime.pool, call, inbound, pin, lacking)
        except NoCapacityError as exc:
            if failures:
                break  # the backends that refused were the last ones: report them, not "no capacity"
            await refuse(send, dialect.error_for(exc), record, runtime)
            return
        except PoolError as exc:
            await refuse(send, dialect.error_for(exc), record, runtime)
            return
        if target is None:  # the client left while queued: nobody to answer
            _client_gone(record, runtime)
            return
        if target.backend in lacking and call.pin is None:
            target.release()  # placed where the route is missing: go to another backend of the model
            pin = runtime.pool.another_backend(inbound.model, lacking | set(no_answer))
            if pin is None:
                await _refuse_lacking(send, call, inbound, sorted(lacking), record, runtime)
                return
            continue
        attempts += 1
        record.backend = target.backend
        try:  # every step after the acquire is inside: whatever fails, the slot goes back
            request = httpx.Request(
                call.method,
                runtime.upstream_url(target.url, call.path),
                headers=upstream_headers(target, record.request_id, call),
                content=inbound.body,
                extensions={"timeout": runtime.timeouts},
            )
            response: httpx.Response | None = None
            async with watch.until_gone():
                response = await runtime.transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            target.release()
            reason = describe_http_error(exc)
            if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):  # reached, but too slow
                message = f"the backend {target.backend} sent no response headers within {runtime.config.read_timeout}s"
                await _refuse_upstream(send, dialect, 504, message, "upstream_timeout", record, runtime)
                return
            if isinstance(exc, httpx.PoolTimeout):  # the pool's own limit, not the backend's fault
                message = "the pool has no free upstream connection; retry shortly"
                error = dialect.error(503, message, "service_unavailable", "upstream_busy", retry_after=1)
                await refuse(send, error, record, runtime)
                return
            failures.append(f"{target.backend}: {reason}")
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
                runtime.monitor.unreachable(target.backend, reason)  # never reached: try another
                if call.pin is not None:
                    break  # the response it names is stored there only
                pin = None
                continue
            # Written, and no answer: maybe the backend's fault, maybe the request's.
            runtime.monitor.failed(target.backend, f"no answer: {reason}")
            no_answer.append(target.backend)
            if call.pin is not None or len(no_answer) >= 2:
                break
            pin = runtime.pool.another_backend(inbound.model, [*no_answer, *lacking])
            if pin is None:
                break
            continue
        except BaseException:
            target.release()
            raise
        if response is None:  # the client left while the backend worked; its connection closed
            target.release()
            _client_gone(record, runtime)
            return
        prefetched: list[bytes] = []
        if route.learns and call.pin is None and response.status_code in (404, 405):
            try:
                missing = await _lacks_route(response, prefetched)
            except BaseException:
                await _give_up(response, target)
                raise
            if missing:
                await _give_up(response, target)
                logger.info(
                    "backend %s lacks %s %s: sending elsewhere", target.backend, call.method, call.path
                )
                runtime.routes.mark_lacking(target.backend, call.path)
                lacking.add(target.backend)
                tried_lacking.append(target.backend)
                attempts -= 1  # not a failure of the backend
                pin = runtime.pool.another_backend(inbound.model, lacking | set(no_answer))
                if pin is None:
                    await _refuse_lacking(send, call, inbound, sorted(lacking), record, runtime)
                    return
                continue
        await _answer(watch, send, runtime, response, target, record, call, prefetched)
        return
    if no_answer:
        message = f"no backend answered the request for model {inbound.model!r}: {'; '.join(failures)}"
        await _refuse_upstream(send, dialect, 502, message, "upstream_no_answer", record, runtime)
        return
    message = f"no backend for model {inbound.model!r} could be reached: {'; '.join(failures)}"
    await _refuse_upstream(send, dialect, 502, message, "upstream_unreachable", record, runtime)


async def _target(
    watch: ClientWatch, pool: Pool, call: Call, inbound: Inbound, pin: str | None, lacking: set[str]
) -> Target | None:
    """Where the request goes: a slot (queued if need be), or for a route that takes none, a
    backend chosen now. None if the client left while queued."""
    if call.route.slot:
        return await _acquire_unless_gone(watch, pool, inbound, pin)
    return pool.pick(inbound.model, avoid=lacking, backend=pin)


async def _lacks_route(response: httpx.Response, prefetched: list[bytes]) -> bool:
    """Whether a 404/405 says the route is missing (rather than, say, the model): 405 always; a 404
    unless its body (the first ``LACKING_BODY`` bytes, kept in ``prefetched``) names a model."""
    if response.status_code == 405:
        return True
    size = 0
    async for chunk in _raw(response):
        prefetched.append(chunk)
        size += len(chunk)
        if size >= LACKING_BODY:
            break
    return b"model" not in b"".join(prefetched)[:LACKING_BODY].lower()


async def _refuse_lacking(
    send: Send, call: Call, inbound: Inbound, lacking: list[str], record: RequestRecord, runtime: Runtime
) -> None:
    model = f" for model {inbound.model!r}" if inbound.model else ""
    message = (
        f"no backend{model} serves {call.method} {call.route.path} "
        f"(lacking it: {', '.join(lacking) or 'all'})"
    )
    await refuse(
        send,
        call.dialect.error(404, message, "invalid_request_error", "route_not_supported"),
        record,
        runtime,
    )


async def _refuse_upstream(
    send: Send,
    dialect: Dialect,
    status: int,
    message: str,
    code: str,
    record: RequestRecord,
    runtime: Runtime,
) -> None:
    """The pool's answer when the backend could not give one (a ``server_error``)."""
    await refuse(send, dialect.error(status, message, "server_error", code), record, runtime)


async def refuse(send: Send, response: Response, record: RequestRecord, runtime: Runtime) -> None:
    """Answer with the pool's own error, recorded under its OpenAI error code (unless already known)."""
    record.status = response.status_code
    if record.outcome == "ok":
        record.outcome = _error_code(response)
    runtime.metrics.observe(record)
    try:
        await response({"type": "http"}, _nothing_to_receive, send)
    except OSError:  # ASGI 2.4: the client left before its answer; nobody to tell
        logger.debug("client left before the pool's %d answer", response.status_code)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


def _error_code(response: Response) -> str:
    code = getattr(response, "code", None)  # the pool's own answers (replies.ErrorReply) carry it
    return str(code) if code else f"status_{response.status_code}"


async def _acquire_unless_gone(
    watch: ClientWatch, pool: Pool, inbound: Inbound, pin: str | None
) -> Lease | None:
    """A slot for the request, or None if the client leaves while it queues (freeing its place)."""
    ticket = pool.submit(inbound.model, priority=inbound.priority, session=inbound.session, pin=pin)
    lease = pool.granted(ticket)
    if lease is not None and not pool.shared:
        return lease  # the common case: a slot was free, nothing to wait for
    async with watch.until_gone():
        # Waits if needed, and with shared state claims the slot fleet-wide; cancelled, it passes
        # on any grant that raced the cancel and gives back any claim.
        return await pool.settle(ticket, lease)
    return None  # the client left


async def _answer(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    response: httpx.Response,
    lease: Target,
    record: RequestRecord,
    call: Call,
    prefetched: list[bytes],
) -> None:
    """Hand the upstream answer to the client; from here on it owns the lease. ``prefetched``: the
    answer's first chunks, already read."""
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
        if response.status_code in GATEWAY_STATUSES:
            runtime.monitor.failed(backend, f"answered {response.status_code}")
        else:
            # Any other answer, a 500 included, says the server is up and answering. A 500 is often
            # the request's own fault (llama.cpp answers 500 to a body it cannot handle): counted
            # against the backend, one client could open its circuit for everyone.
            runtime.monitor.succeeded(backend)
        relay: UpstreamRelay | None = None
        headers = client_headers(response, extra)
        chunks = _after(prefetched, _raw(response)) if prefetched else _raw(response)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        length = response.headers.get("content-length", "")
        if streamed or (length.isdigit() and int(length) > SMALL_ANSWER):
            relay = UpstreamRelay(response, lease, headers, chunks, runtime=runtime, record=record, call=call)
    except BaseException:
        await _give_up(response, lease)
        raise
    if relay is None:
        relay = await _answer_whole(watch, send, response, lease, headers, chunks, record, runtime, call)
    if relay is not None:
        await relay(watch, send)


async def _give_up(response: httpx.Response, lease: Target) -> None:
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
        await _give_up(response, lease)
        reason = describe_http_error(exc)
        runtime.monitor.failed(lease.backend, f"died mid-response: {reason}")
        record.outcome = "failed_midway"
        message = f"the backend {lease.backend} failed during the response: {reason}"
        await _refuse_upstream(send, call.dialect, 502, message, "upstream_failed", record, runtime)
        return None
    except BaseException:
        await _give_up(response, lease)
        raise
    try:
        await response.aclose()  # read to the end: this only hands the connection back
    finally:
        lease.release()
    if not read_all:  # the client left while the answer was read
        _client_gone(record, runtime)
        return None
    whole = body[0] if len(body) == 1 else b"".join(body)
    record.first_byte = time.monotonic() - record.started
    usage = UsageSniffer(event_stream=False, want_id=call.route.remembers_response)
    usage.feed(whole)
    usage.finish()
    record.take_usage(usage.usage)
    if usage.response_id is not None and response.status_code < 300:
        await _remember(runtime, usage.response_id, lease.backend)  # before the client can name it
    record.status, record.outcome = response.status_code, outcome_of(response.status_code)
    runtime.metrics.observe(record)
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
        await runtime.pool.remember_response(response_id, backend)


def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """The bytes as the backend sent them (identity encoding was asked for; anything else passes on)."""
    return cast(httpx.AsyncByteStream, response.stream).__aiter__()


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
    ) -> None:
        self.upstream = upstream
        self.lease = lease
        self.runtime = runtime
        self.record = record
        self.dialect = call.dialect
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
        watchdog: asyncio.Task[None] | None = None
        try:
            if timeout is not None:
                watchdog = asyncio.get_running_loop().create_task(self._watch_sending(watch, timeout))
            async with watch.until_gone():
                await self._relay(send)
        finally:
            if watchdog is not None:
                watchdog.cancel()
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
            self._report()

    async def _relay(self, send: Send) -> None:
        record = self.record
        chunks = self._chunks
        try:
            await send(
                {"type": "http.response.start", "status": self.upstream.status_code, "headers": self.headers}
            )
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # any transport's read error: the status is already sent
                    await self._upstream_failed(send, exc)
                    return
                if record.first_byte is None:
                    record.first_byte = time.monotonic() - record.started
                self._usage.feed(chunk)
                if self._remembers and self._usage.response_id is not None:
                    self._remembers = False  # once, before the client has the id
                    await _remember(self.runtime, self._usage.response_id, self.lease.backend)
                self._sending_since = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._sending_since = None
            self._relayed_all = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 reports a client that left as a failed send; leaving is not an error
            logger.debug("client left during the response from %s", self.lease.backend)

    async def _upstream_failed(self, send: Send, exc: Exception) -> None:
        reason = f"{exc or type(exc).__name__}"
        logger.warning("backend %s failed mid-response: %s", self.lease.backend, reason)
        self.runtime.monitor.failed(self.lease.backend, f"died mid-response: {reason}")
        self.record.outcome = "failed_midway"
        if not self.is_event_stream:
            return  # ending without the final message: the client's connection is cut, not completed
        message = f"the backend {self.lease.backend} failed during the response: {reason}"
        event = self.dialect.stream_error(message, "upstream_failed")
        await send({"type": "http.response.body", "body": event, "more_body": False})

    async def _watch_sending(self, watch: ClientWatch, timeout: float) -> None:
        """A client that stops reading fills its socket and blocks a send forever: one check every half
        timeout (not a timer per chunk) frees the slot and stops the backend."""
        while True:
            await asyncio.sleep(timeout / 2)
            since = self._sending_since
            if since is not None and time.monotonic() - since > timeout:
                self._too_slow = True
                watch.end_waits()
                return

    def _report(self) -> None:
        record = self.record
        record.status = self.upstream.status_code
        self._usage.finish()
        record.take_usage(self._usage.usage)
        if self._too_slow:
            record.outcome = "client_too_slow"
        elif record.outcome == "ok":
            record.outcome = outcome_of(record.status) if self._relayed_all else "client_gone"
        self.runtime.metrics.observe(record)
