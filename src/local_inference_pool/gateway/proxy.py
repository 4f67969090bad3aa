"""Choose and reach a backend for one request: queue for a slot (if the route takes one), send the
request upstream, and hand what comes back to the relay.

The hot path of the gateway, in raw ASGI. What it guarantees before an answer reaches the client:
- a backend that cannot be reached is taken out and the request goes to another (at most
  ``MAX_ATTEMPTS`` backends); a backend's own 4xx/5xx passes through;
- a backend that lacks the route is learned and the request goes to another backend of the model;
- a client that leaves while queued frees its place, and one that leaves while the backend works
  on its answer closes the upstream connection, so the backend stops;
- whatever fails, the slot taken is given back (from the answer on, the relay owns it).

Requests go through the shared client's transport directly: a proxy must not keep one client's
cookies for the next, follows no redirects and adds no auth, which is all ``AsyncClient.send`` adds,
at a measured 170 µs per request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.types import Receive, Send

from local_inference_pool.core.model import LeaseRequest
from local_inference_pool.errors import NoCapacityError, PoolError
from local_inference_pool.gateway.client_watch import ClientWatch
from local_inference_pool.gateway.failover import (
    API,
    Partial,
    Recorder,
    Seam,
    continuation,
    read_partial,
    refusal,
)
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.refusals import client_gone, send_refusal, send_upstream_refusal
from local_inference_pool.gateway.relay import (
    AnswerBroke,
    UpstreamRelay,
    close_unread,
    continue_stream,
    end_stream,
    raw_chunks,
    relay_answer,
)
from local_inference_pool.gateway.runtime import Call, Runtime, Target
from local_inference_pool.pool import Lease, Pool
from local_inference_pool.upstream.backends import continues
from local_inference_pool.upstream.backends.openai import describe_http_error

__all__ = ["MAX_ATTEMPTS", "forward", "upstream_headers", "upstream_request"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # the first backend and up to two others after a connection failure
LACKING_BODY = 4096  # of a 404 answer, read to tell a missing route from a missing model


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


def upstream_request(
    runtime: Runtime, call: Call, target: Target, record: RequestRecord, body: bytes
) -> httpx.Request:
    """The request to send the target: the call's method and path, the backend's headers, ``body``."""
    return httpx.Request(
        call.method,
        runtime.upstream_url(target.url, call.path),
        headers=upstream_headers(target, record.request_id, call),
        content=body,
        extensions={"timeout": runtime.timeouts},
    )


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
    why_not = refusal(inbound.payload, route.path)
    continuable = runtime.config.midstream_failovers > 0 and why_not is None
    failures: list[str] = []
    no_answer: list[str] = []  # backends that took the request and gave no answer
    lacking = runtime.routes.lacking(call.path) if route.learns else set()
    pin: str | None = call.pin
    attempts = 0
    while attempts < MAX_ATTEMPTS:
        record.retries = len(failures)
        try:
            target = await _target(watch, runtime.pool, call, inbound, pin, lacking)
        except NoCapacityError as exc:
            if failures:
                break  # the backends that refused were the last ones: report them, not "no capacity"
            await send_refusal(send, dialect.error_for(exc), record, runtime)
            return
        except PoolError as exc:
            await send_refusal(send, dialect.error_for(exc), record, runtime)
            return
        if target is None:  # the client left while queued: nobody to answer
            client_gone(record, runtime)
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
            request = upstream_request(runtime, call, target, record, inbound.body)
            response: httpx.Response | None = None
            async with watch.until_gone():
                response = await runtime.transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            target.release()
            reason = describe_http_error(exc)
            if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):  # reached, but too slow
                message = f"the backend {target.backend} sent no response headers within {runtime.config.read_timeout}s"
                await send_upstream_refusal(send, dialect, 504, message, "upstream_timeout", record, runtime)
                return
            if isinstance(exc, httpx.PoolTimeout):  # the pool's own limit, not the backend's fault
                message = "the pool has no free upstream connection; retry shortly"
                error = dialect.error(503, message, "service_unavailable", "upstream_busy", retry_after=1)
                await send_refusal(send, error, record, runtime)
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
            client_gone(record, runtime)
            return
        prefetched: list[bytes] = []
        if route.learns and call.pin is None and response.status_code in (404, 405):
            try:
                missing = await _lacks_route(response, prefetched)
            except BaseException:
                await close_unread(response, target)
                raise
            if missing:
                await close_unread(response, target)
                logger.info(
                    "backend %s lacks %s %s: sending elsewhere", target.backend, call.method, call.path
                )
                runtime.routes.mark_lacking(target.backend, call.path)
                lacking.add(target.backend)
                attempts -= 1  # not a failure of the backend
                pin = runtime.pool.another_backend(inbound.model, lacking | set(no_answer))
                if pin is None:
                    await _refuse_lacking(send, call, inbound, sorted(lacking), record, runtime)
                    return
                continue
        recorder = Recorder() if continuable else None
        try:
            relay = await relay_answer(
                watch,
                send,
                runtime,
                response,
                target,
                record,
                call,
                prefetched,
                recorder=recorder,
                rerun=not no_answer and call.pin is None,  # once, and not from a stored response
            )
        except AnswerBroke as broke:
            # Nothing reached the client: like a request that got no answer, sent once more to
            # another backend, never to a third.
            failures.append(str(broke))
            no_answer.append(target.backend)
            pin = runtime.pool.another_backend(inbound.model, [*no_answer, *lacking])
            if pin is None:
                message = broke.message
                record.outcome = "failed_midway"
                await send_upstream_refusal(send, dialect, 502, message, "upstream_failed", record, runtime)
                return
            continue
        if relay is not None and relay.interrupted is not None and recorder is not None:
            await _fail_over(watch, send, runtime, call, inbound, record, relay, recorder)
        elif record.outcome == "failed_midway" and why_not not in ("route", "not streamed"):
            # A stream that could have been continued but may not be: say why, in the metrics too.
            outcome = "off" if why_not is None else "not_faithful"
            logger.info(
                "not continuing a stream of %r: %s", inbound.model, why_not or "midstream_failovers is 0"
            )
            runtime.metrics.failover(inbound.model, outcome)
        return
    if no_answer:
        message = f"no backend answered the request for model {inbound.model!r}: {'; '.join(failures)}"
        await send_upstream_refusal(send, dialect, 502, message, "upstream_no_answer", record, runtime)
        return
    message = f"no backend for model {inbound.model!r} could be reached: {'; '.join(failures)}"
    await send_upstream_refusal(send, dialect, 502, message, "upstream_unreachable", record, runtime)


async def _fail_over(
    watch: ClientWatch,
    send: Send,
    runtime: Runtime,
    call: Call,
    inbound: Inbound,
    record: RequestRecord,
    relay: UpstreamRelay,
    recorder: Recorder,
) -> None:
    """A stream whose backend failed midway, the client still there: continue it on another backend
    of the model (pinned there, ahead of its queue: this request already waited), at most
    ``midstream_failovers`` times, or end it with the route's error event saying why not."""
    pool, route, model = runtime.pool, call.route.path, inbound.model
    failed = [relay.lease.backend]
    message = f"the backend {relay.lease.backend} failed during the response: {relay.interrupted}"
    outcome = "budget_spent"
    for _attempt in range(runtime.config.midstream_failovers):
        partial = read_partial(bytes(recorder.buffer), route)
        if partial.finished:  # it failed after its end marker: nothing is missing
            await end_stream(send, None, record, runtime, "ok")
            return
        if partial.refusal is not None:
            outcome = "not_faithful"
            logger.info("not continuing a stream of %r: %s", model, partial.refusal)
            break
        target_name, body = _continuable_backend(pool, model, failed, inbound.payload, partial, route)
        if target_name is None or body is None:
            outcome = "no_backend"
            break
        again = Inbound(
            body, model, inbound.priority, inbound.session, inbound.payload, inbound.tenant, inbound.prompt
        )
        try:
            target = await _acquire_unless_gone(watch, pool, again, target_name)
        except PoolError:
            outcome = "no_backend"
            break
        if target is None:
            client_gone(record, runtime)
            return
        response = await _send_continuation(watch, runtime, call, target, record, body)
        if response is None:
            if watch.gone:
                client_gone(record, runtime)
                return
            failed.append(target.backend)
            outcome = "failed"
            continue
        record.failed_over_from.append(relay.lease.backend)
        record.backend = target.backend
        seam = Seam(partial, route)
        failed_at = relay.failed_at
        relay = await continue_stream(watch, send, runtime, response, target, record, call, recorder, seam)
        gap = None if relay.first_sent_at is None or failed_at is None else relay.first_sent_at - failed_at
        runtime.metrics.failover(model, "continued", gap)
        if relay.interrupted is None:
            return  # the continuation ran to its end (and reported the request)
        failed.append(relay.lease.backend)
        message = f"the backend {relay.lease.backend} failed during the response: {relay.interrupted}"
        outcome = "budget_spent"
    runtime.metrics.failover(model, outcome)
    await end_stream(
        send, call.dialect.stream_error(message, "upstream_failed"), record, runtime, "failed_midway"
    )


def _continuable_backend(
    pool: Pool, model: str, failed: list[str], payload: Mapping[str, Any], partial: Partial, route: str
) -> tuple[str | None, bytes | None]:
    """Another healthy backend of the model whose kind can continue the answer, and the body."""
    avoid = list(failed)
    while (name := pool.another_backend(model, avoid)) is not None:
        body = continuation(payload, partial, route, continues(pool.backends.kind(name), API[route]))
        if body is not None:
            return name, body
        avoid.append(name)
    return None, None


async def _send_continuation(
    watch: ClientWatch, runtime: Runtime, call: Call, target: Target, record: RequestRecord, body: bytes
) -> httpx.Response | None:
    """The continuation's streamed answer, or None (the slot given back) if it gave none."""
    request = upstream_request(runtime, call, target, record, body)
    response: httpx.Response | None = None
    try:
        async with watch.until_gone():
            response = await runtime.transport.handle_async_request(request)
    except httpx.HTTPError as exc:
        target.release()
        runtime.monitor.failed(target.backend, f"continuation: {describe_http_error(exc)}")
        return None
    except BaseException:
        target.release()
        raise
    if response is None:
        target.release()
        return None
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
        "text/event-stream"
    ):
        await close_unread(response, target)
        return None
    return response


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
    async for chunk in raw_chunks(response):
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
    await send_refusal(
        send,
        call.dialect.error(404, message, "invalid_request_error", "route_not_supported"),
        record,
        runtime,
    )


async def _acquire_unless_gone(
    watch: ClientWatch, pool: Pool, inbound: Inbound, pin: str | None
) -> Lease | None:
    """A slot for the request, or None if the client leaves while it queues (freeing its place)."""
    acquiring = pool.acquire(
        LeaseRequest(
            inbound.model,
            priority=inbound.priority,
            session=inbound.session,
            timeout=pool.config.queue_timeout,
            pin=pin,
            tenant=inbound.tenant,
            prompt=inbound.prompt,
        )
    )
    lease = acquiring.at_once()
    if lease is not None:
        return lease  # the common case: a slot was free, nothing to wait for
    async with watch.until_gone():
        # Waits if needed, and with shared state claims the slot fleet-wide; cancelled, it passes
        # on any grant that raced the cancel and gives back any claim.
        return await acquiring
    return None  # the client left
