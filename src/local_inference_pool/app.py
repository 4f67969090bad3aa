"""The OpenAI-compatible ASGI sub-application, its lifespan, and the ways hosts wire it in.

::

    pool_app = create_pool_app(config)
    app = FastAPI(lifespan=pool_lifespan(pool_app))   # or Starlette(lifespan=...)
    app.mount("/v1", pool_app)

    application = PoolMiddleware(get_asgi_application(), config, path="/v1")   # Django: no lifespan

Runtime state (the shared HTTP client, the pool, the health pollers) is made inside the lifespan and
kept on the sub-app's ``state``, never at import or factory time. Without a running lifespan every
pool route answers 503 with a message saying how to wire it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Lifespan, Receive, Scope, Send

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import NoCapacityError, PoolError
from local_inference_pool.health import Monitor
from local_inference_pool.metrics import PoolMetrics, RequestRecord, UsageSniffer
from local_inference_pool.pool import _DEFAULT, Lease, Pool, describe_http_error
from local_inference_pool.proxy import (
    CLOSE_UPSTREAM_SECONDS,
    UpstreamResponse,
    client_headers,
    outcome_of,
    upstream_headers,
)
from local_inference_pool.scheduler import Health, TicketState

__all__ = [
    "PoolMiddleware",
    "TransportFactory",
    "create_pool_app",
    "create_standalone_app",
    "make_client",
    "pool_lifespan",
]

logger = logging.getLogger(__name__)

TransportFactory = Callable[[httpx.Limits], httpx.AsyncBaseTransport]
UPSTREAM_PATHS = {
    "/chat/completions": "/v1/chat/completions",
    "/completions": "/v1/completions",
    "/embeddings": "/v1/embeddings",
}
MAX_ATTEMPTS = 3  # the first backend and up to two others after a connection failure


def aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection pool: 7.7x httpx 0.28's own at 32 concurrent requests and
    16x at 128, measured here (bench/transport.py). Its errors are mapped loosely (a server closing
    the connection surfaces as ConnectTimeout), so the proxy classifies failures by whether the
    response headers arrived, never by exception type alone."""
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=limits, trust_env=False)


def make_client(config: PoolConfig, transport: TransportFactory | None = None) -> httpx.AsyncClient:
    """The one client for all upstream traffic: long reads (a first token may take minutes while a
    model loads), bounded connects, enough connections for every slot, no proxy variables."""
    slots = sum(b.slots or 4 for b in config.backends)
    limits = httpx.Limits(max_connections=max(256, 4 * slots), max_keepalive_connections=max(64, 2 * slots))
    timeout = httpx.Timeout(
        connect=config.connect_timeout, read=config.read_timeout, write=60.0, pool=config.connect_timeout
    )
    factory = transport or aiohttp_transport
    return httpx.AsyncClient(transport=factory(limits), timeout=timeout, limits=limits, trust_env=False)


@dataclass
class Runtime:
    config: PoolConfig
    pool: Pool
    client: httpx.AsyncClient
    monitor: Monitor
    metrics: PoolMetrics


def create_pool_app(config: PoolConfig, *, transport: TransportFactory | None = None) -> Starlette:
    """An OpenAI-compatible app for ``config``'s backends, to mount at ``/v1`` or serve alone.

    ``transport`` builds the shared client's transport from its connection limits (default: aiohttp);
    tests pass ``httpx.MockTransport``-returning factories.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = Pool(config, initial_health=Health.LOADING)
        async with make_client(config, transport) as client, anyio.create_task_group() as group:
            monitor = Monitor(pool, client, config)
            await group.start(monitor.run)
            app.state.runtime = Runtime(config, pool, client, monitor, PoolMetrics(pool))
            try:
                yield
            finally:
                # Queued requests fail with 503 now; in-flight ones may finish within the grace.
                await pool.aclose(grace=config.shutdown_grace)
                app.state.runtime = None
                group.cancel_scope.cancel()

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return openai_error(
                405,
                f"{request.method} is not allowed on {request.url.path}",
                "invalid_request_error",
                "method_not_allowed",
            )
        return openai_error(
            exc.status_code,
            f"no route {request.method} {request.url.path}; this endpoint serves /chat/completions, "
            "/completions, /embeddings, /models and /pool/status",
            "invalid_request_error",
            "not_found",
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return openai_error(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")

    app = Starlette(
        routes=[
            *(Route(path, _completion_route(path), methods=["POST"]) for path in UPSTREAM_PATHS),
            Route("/models", _models, methods=["GET"]),
            Route("/pool/status", _status, methods=["GET"]),
            Route("/pool/metrics", _metrics, methods=["GET"]),
            Route("/pool/", _dashboard, methods=["GET"]),
            Route("/pool/dashboard", _dashboard, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, Exception: unexpected},
    )
    app.state.runtime = None
    app.state.config = config
    return app


def create_standalone_app(config: PoolConfig, *, transport: TransportFactory | None = None) -> ASGIApp:
    """What ``local-inference-pool serve`` runs: the pool at ``/v1``, its lifespan run, nothing else.

    A thin path dispatch rather than a Starlette ``Mount``: a second Starlette app would wrap every
    request and every streamed chunk in a second set of middleware.
    """
    return PoolMiddleware(_outside_the_pool, config, path="/v1", transport=transport)


async def _outside_the_pool(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    response = openai_error(
        404, f"no route {scope['path']}: the pool is served under /v1", "invalid_request_error", "not_found"
    )
    await response(scope, receive, send)


def pool_lifespan(pool_app: Starlette, host_lifespan: Lifespan[Any] | None = None) -> Lifespan[Any]:
    """A lifespan for the host that runs the mounted pool app's own (mounted apps' are not run)."""

    @asynccontextmanager
    async def lifespan(host: Any) -> AsyncIterator[Any]:
        async with pool_app.router.lifespan_context(pool_app):
            if host_lifespan is None:
                yield None
            else:
                async with host_lifespan(host) as state:
                    yield state

    return lifespan


class PoolMiddleware:
    """Serve the pool at ``path`` in front of a host app that has no lifespan (Django's ASGI handler).

    It answers the ASGI lifespan itself (starting and stopping the pool) and does not pass it on;
    HTTP requests under ``path`` go to the pool app, everything else to the host.
    """

    def __init__(self, app: ASGIApp, config: PoolConfig, path: str = "/v1", **kwargs: Any) -> None:
        self.app = app
        self.path = "/" + path.strip("/")
        self.pool_app = create_pool_app(config, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.pool_app(scope, receive, send)
            return
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (path == self.path or path.startswith(self.path + "/")):
            child = dict(scope)
            child["root_path"] = scope.get("root_path", "") + self.path
            child["path"] = path[len(self.path) :] or "/"
            child["raw_path"] = child["path"].encode()
            await self.pool_app(child, receive, send)
            return
        await self.app(scope, receive, send)


# --- routes --------------------------------------------------------------------------------


def openai_error(
    status: int, message: str, error_type: str, code: str | None, *, retry_after: float | None = None
) -> JSONResponse:
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_code(response: Response) -> str:
    """The OpenAI error code of an answer the pool made itself, as the request's outcome."""
    if response.status_code == 499:
        return "client_gone"
    try:
        code = json.loads(bytes(response.body))["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"status_{response.status_code}"
    return str(code)


def _pool_error(error: PoolError) -> JSONResponse:
    body = error.to_openai()
    err = body["error"]
    return openai_error(error.status, err["message"], err["type"], err["code"], retry_after=error.retry_after)


def _runtime(request: Request) -> Runtime | Response:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return openai_error(
            503,
            "the pool is not running: its lifespan was not started. When mounting it, create the host "
            "with lifespan=pool_lifespan(pool_app); for a host without a lifespan (Django), wrap it in "
            "PoolMiddleware(host_app, config)",
            "service_unavailable",
            "pool_not_started",
        )
    return runtime


def _authorized(request: Request, config: PoolConfig, *, browser: bool = False) -> bool:
    """``Authorization: Bearer <key>``; for pages a browser opens, also Basic with the key as password."""
    if not config.api_keys:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if browser and scheme.lower() == "basic":
        try:
            token = base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    if not token:
        return False
    token_bytes = token.strip().encode()
    # Compare against every key so the time taken does not say which one came close.
    matches = [hmac.compare_digest(token_bytes, key.encode()) for key in config.api_keys]
    return any(matches)


def _unauthorized(*, browser: bool = False) -> JSONResponse:
    response = openai_error(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <key>' with one of the pool's keys",
        "invalid_request_error",
        "invalid_api_key",
    )
    if browser:  # lets a browser ask for the key (any user name, the key as password)
        response.headers["www-authenticate"] = 'Basic realm="local-inference-pool"'
    return response


async def _read_body(request: Request, limit: int) -> bytes | Response:
    declared = request.headers.get("content-length")
    too_large = openai_error(
        413, f"the request body is larger than {limit} bytes", "invalid_request_error", "body_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _session_key(request: Request, payload: Mapping[str, Any]) -> str | None:
    """x-session-id, else the request's ``user``, else a hash of the conversation's start."""
    header = request.headers.get("x-session-id")
    if header:
        return f"header:{header}"
    user = payload.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        prefix: list[Any] = []
        for message in messages:
            prefix.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return "prefix:" + hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()[:32]
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        return "prefix:" + hashlib.sha256(prompt[:1024].encode()).hexdigest()[:32]
    return None


_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(request: Request) -> str:
    """The client's x-request-id when it is a plain token (it is sent on to the backend), else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _completion_route(path: str) -> Callable[[Request], Any]:
    upstream_path = UPSTREAM_PATHS[path]

    async def route(request: Request) -> Response:
        runtime = _runtime(request)
        if isinstance(runtime, Response):
            return runtime
        record = RequestRecord(request_id=_request_id(request), model="-")
        response = await handle(request, runtime, record)
        if not isinstance(response, UpstreamResponse) and not record.reported:  # the pool's own answer
            record.status = response.status_code
            record.outcome = _error_code(response)
            runtime.metrics.observe(record)
        return response

    async def handle(request: Request, runtime: Runtime, record: RequestRecord) -> Response:
        if not _authorized(request, runtime.config):
            return _unauthorized()
        try:
            body = await _read_body(request, runtime.config.max_body_size)
        except ClientDisconnect:
            return Response(status_code=499)
        if isinstance(body, Response):
            return body
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return openai_error(
                400, "the request body is not valid JSON", "invalid_request_error", "invalid_json"
            )
        if not isinstance(payload, dict):
            return openai_error(
                400, "the request body must be a JSON object", "invalid_request_error", "invalid_body"
            )
        model = payload.get("model")
        if isinstance(model, str):
            record.model = model
        if not isinstance(model, str) or not model:
            return openai_error(
                400,
                "'model' is required and must be a non-empty string",
                "invalid_request_error",
                "invalid_model",
            )
        priority_header = request.headers.get("x-priority", "0")
        try:
            priority = int(priority_header)
        except ValueError:
            return openai_error(
                400,
                f"x-priority must be an integer, not {priority_header!r}",
                "invalid_request_error",
                "invalid_priority",
            )
        session = _session_key(request, payload)
        return await _forward(request, runtime, upstream_path, body, priority, session, record)

    return route


async def _acquire_unless_gone(
    request: Request, pool: Pool, model: str, priority: int, session: str | None
) -> Lease | None:
    """A slot for the request; while it has to queue, watch the client: one that leaves frees its place."""
    ticket = pool._submit(model=model, priority=priority, session=session, timeout=_DEFAULT, pin=None)
    if ticket.state is not TicketState.WAITING:
        return pool._take(ticket)  # the common case: a slot was free, nothing to wait for
    lease: Lease | None = None
    error: PoolError | None = None
    async with anyio.create_task_group() as group:

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch_disconnect)
        try:
            lease = await pool._wait(ticket)
        except PoolError as exc:
            error = exc  # raised below: inside the group it would arrive wrapped in an ExceptionGroup
        group.cancel_scope.cancel()
    if error is not None:
        raise error
    return lease


async def _forward(
    request: Request,
    runtime: Runtime,
    upstream_path: str,
    body: bytes,
    priority: int,
    session: str | None,
    record: RequestRecord,
) -> Response:
    model = record.model
    failures: list[str] = []
    for _attempt in range(MAX_ATTEMPTS):
        record.retries = len(failures)
        try:
            lease = await _acquire_unless_gone(request, runtime.pool, model, priority, session)
        except NoCapacityError as exc:
            if failures:
                break  # the backends that refused were the last ones: report them, not "no capacity"
            return _pool_error(exc)
        except PoolError as exc:
            return _pool_error(exc)
        if lease is None:
            return Response(status_code=499)  # the client left while queued: nobody to answer
        try:  # every step after the acquire is inside: whatever fails, the lease goes back
            upstream = runtime.client.build_request(
                "POST",
                lease.url + upstream_path,
                content=body,
                headers=upstream_headers(lease, record.request_id),
            )
            response = await runtime.client.send(upstream, stream=True)
        except httpx.TimeoutException as exc:
            lease.release()
            record.backend = lease.backend
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                failures.append(f"{lease.backend}: {describe_http_error(exc)}")
                runtime.monitor.unreachable(lease.backend, describe_http_error(exc))
                continue
            return openai_error(
                504,
                f"the backend {lease.backend} sent no response headers within {runtime.config.read_timeout}s",
                "server_error",
                "upstream_timeout",
            )
        except httpx.HTTPError as exc:
            # Nothing reached the client yet: take the backend out and try another.
            lease.release()
            failures.append(f"{lease.backend}: {describe_http_error(exc)}")
            runtime.monitor.unreachable(lease.backend, describe_http_error(exc))
            continue
        except BaseException:
            lease.release()
            raise
        extra = {
            "x-backend": lease.backend,
            "x-queue-wait-ms": f"{lease.queue_wait * 1000:.1f}",
            "x-request-id": record.request_id,
        }
        if lease.affinity is not None:
            extra["x-session-affinity"] = lease.affinity.value
        backend = record.backend = lease.backend
        record.queue_wait = lease.queue_wait
        try:  # until a response owns the lease, a failure here must still give it back
            if response.status_code >= 500:
                runtime.monitor.failed(backend, f"answered {response.status_code}")
            else:
                runtime.monitor.succeeded(backend)
            if _small_answer(response):
                return await _answer_whole(response, lease, extra, record, runtime)
            return UpstreamResponse(
                response,
                lease,
                extra,
                on_failure=functools.partial(runtime.monitor.failed, backend),
                record=record,
                metrics=runtime.metrics,
                send_timeout=runtime.config.send_timeout,
            )
        except BaseException:
            if not lease.released:
                with anyio.move_on_after(CLOSE_UPSTREAM_SECONDS, shield=True):
                    await response.aclose()
                lease.release()
            raise
    return openai_error(
        502,
        f"no backend for model {model!r} could be reached: {'; '.join(failures)}",
        "server_error",
        "upstream_unreachable",
    )


SMALL_ANSWER = 1 << 20


def _small_answer(response: httpx.Response) -> bool:
    """A non-streaming answer of a declared, modest size: read whole rather than relayed."""
    length = response.headers.get("content-length", "")
    content_type = response.headers.get("content-type", "")
    return (
        length.isdigit() and int(length) <= SMALL_ANSWER and not content_type.startswith("text/event-stream")
    )


async def _answer_whole(
    response: httpx.Response, lease: Lease, extra: dict[str, str], record: RequestRecord, runtime: Runtime
) -> Response:
    """Read a small answer and send it in one message: no streaming machinery for a plain request.

    Reading it first also means a backend that dies midway gets a clean 502, not a cut-off body.
    """
    try:
        body = await response.aread()
    except httpx.HTTPError as exc:
        runtime.monitor.failed(lease.backend, f"died mid-response: {describe_http_error(exc)}")
        record.outcome = "failed_midway"
        answer: Response = openai_error(
            502,
            f"the backend {lease.backend} failed during the response: {describe_http_error(exc)}",
            "server_error",
            "upstream_failed",
        )
    else:
        record.first_byte = time.monotonic() - record.started
        usage = UsageSniffer(event_stream=False)
        usage.feed(body)
        usage.finish()
        record.take_usage(usage.usage)
        record.outcome = outcome_of(response.status_code)
        answer = Response(body, status_code=response.status_code, headers=client_headers(response, extra))
    finally:
        with anyio.move_on_after(CLOSE_UPSTREAM_SECONDS, shield=True):
            await response.aclose()
        lease.release()
    record.status = answer.status_code
    runtime.metrics.observe(record)
    return answer


async def _models(request: Request) -> Response:
    runtime = _runtime(request)
    if isinstance(runtime, Response):
        return runtime
    if not _authorized(request, runtime.config):
        return _unauthorized()
    served: dict[str, list[str]] = {}
    for backend in runtime.pool.scheduler.backends.values():
        if backend.health is Health.HEALTHY and backend.models:
            for model in backend.models:
                served.setdefault(model, []).append(backend.name)
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "local-inference-pool",
            "backends": sorted(names),
        }
        for model, names in sorted(served.items())
    ]
    return JSONResponse({"object": "list", "data": data})


def _observer(request: Request) -> Runtime | Response:
    """The runtime, for status, metrics and the dashboard: open when ``public_status`` is set."""
    runtime = _runtime(request)
    if isinstance(runtime, Response):
        return runtime
    if not runtime.config.public_status and not _authorized(request, runtime.config, browser=True):
        return _unauthorized(browser=True)
    return runtime


async def _status(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    return JSONResponse({**runtime.pool.snapshot(), "traffic": runtime.metrics.traffic()})


async def _metrics(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _dashboard(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    page = (
        resources.files("local_inference_pool").joinpath("dashboard/index.html").read_text(encoding="utf-8")
    )
    return HTMLResponse(page, headers={"cache-control": "no-cache"})
