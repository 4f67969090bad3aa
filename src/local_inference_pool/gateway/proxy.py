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

import httpx
from starlette.types import Receive, Send

from local_inference_pool.errors import NoCapacityError, PoolError
from local_inference_pool.gateway.client_watch import ClientWatch
from local_inference_pool.gateway.failover import Recorder, refusal
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.gateway.leasing import acquire_unless_gone
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.midstream import fail_over
from local_inference_pool.gateway.refusals import client_gone, send_refusal, send_upstream_refusal
from local_inference_pool.gateway.relay import (
    AnswerBroke,
    DrainEnded,
    close_unread,
    raw_chunks,
    relay_answer,
)
from local_inference_pool.gateway.runtime import Call, Runtime, Target, upstream_request
from local_inference_pool.pool import Pool
from local_inference_pool.upstream.backends.openai import describe_http_error

__all__ = ["MAX_ATTEMPTS", "forward"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # the first backend and up to two others after a connection failure
LACKING_BODY = 4096  # of a 404 answer, read to tell a missing route from a missing model


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
        drained = False
        try:  # every step after the acquire is inside: whatever fails, the slot goes back
            request = upstream_request(runtime, call, target, record, inbound.body)
            response: httpx.Response | None = None
            async with watch.until_gone() as wait:
                with target.cut_by(wait.cut):
                    response = await runtime.transport.handle_async_request(request)
            if wait.cut_short:  # its drain ended before it answered: as a dead server's
                drained = True
                raise httpx.ReadError(str(DrainEnded(target.backend)))
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
            # Written, and no answer: maybe the backend's fault, maybe the request's (not a drain's).
            if not drained:
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
            await fail_over(watch, send, runtime, call, inbound, record, relay, recorder)
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


async def _target(
    watch: ClientWatch, pool: Pool, call: Call, inbound: Inbound, pin: str | None, lacking: set[str]
) -> Target | None:
    """Where the request goes: a slot (queued if need be), or for a route that takes none, a
    backend chosen now. None if the client left while queued."""
    if call.route.slot:
        return await acquire_unless_gone(watch, pool, inbound, pin)
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
