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

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import quote

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Lifespan, Receive, Scope, Send

from local_inference_pool.config import ConfigSource, PoolConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.errors import InvalidRequestError, PoolError, StateUnavailableError
from local_inference_pool.gateway.accounting import KeyAccounting
from local_inference_pool.gateway.admin import ADMIN_ROUTES, admin_holder
from local_inference_pool.gateway.changes import FleetChanges
from local_inference_pool.gateway.dialects import ANTHROPIC, OPENAI, Dialect
from local_inference_pool.gateway.inbound import (
    ClientGone,
    Inbound,
    authorization,
    authorized,
    given_priority,
    key_holder,
    key_priority,
    priority,
    read_body,
    read_form,
    read_inbound,
    request_id,
)
from local_inference_pool.gateway.metrics import PoolMetrics, RequestRecord
from local_inference_pool.gateway.model_placer import ModelPlacer
from local_inference_pool.gateway.model_routing import as_configured, served_headers
from local_inference_pool.gateway.model_view import model_facts, models_status
from local_inference_pool.gateway.plain_routes import PoolApp
from local_inference_pool.gateway.proxy import forward
from local_inference_pool.gateway.refusals import send_refusal
from local_inference_pool.gateway.replies import error_response, openai_error
from local_inference_pool.gateway.request_log import RequestLog
from local_inference_pool.gateway.routes import ModelFrom, RouteSpec, routes_for
from local_inference_pool.gateway.runtime import PASSED_HEADERS, RESPONSE_ID, Call, Runtime
from local_inference_pool.gateway.tracing import tracing_for
from local_inference_pool.gateway.usage_report import usage_summary
from local_inference_pool.pool import Pool
from local_inference_pool.upstream.health import Monitor
from local_inference_pool.upstream.transport import AiohttpTransport

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


def upstream_limits(config: PoolConfig) -> httpx.Limits:
    """Enough connections for every slot of every backend, with room for probes. Idle ones are dropped
    after 4 s: servers commonly close theirs at 5 s (uvicorn, cpp-httplib in llama-server)."""
    slots = sum(b.slots or 4 for b in config.backends)
    return httpx.Limits(
        max_connections=max(256, 4 * slots),
        max_keepalive_connections=max(64, 2 * slots),
        keepalive_expiry=4.0,
    )


def make_client(config: PoolConfig, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The one client for all upstream traffic: long reads (a first token may take minutes while a
    model loads), bounded connects, no proxy variables; over ``AiohttpTransport`` unless told otherwise."""
    limits = upstream_limits(config)
    timeout = httpx.Timeout(
        connect=config.connect_timeout, read=config.read_timeout, write=60.0, pool=config.connect_timeout
    )
    return httpx.AsyncClient(
        transport=transport or AiohttpTransport(limits), timeout=timeout, limits=limits, trust_env=False
    )


def create_pool_app(
    config: PoolConfig,
    *,
    transport: TransportFactory | None = None,
    source: ConfigSource | None = None,
) -> Starlette:
    """An OpenAI-compatible app for ``config``'s backends, to mount at ``/v1`` or serve alone.

    ``transport`` builds the shared client's transport from its connection limits (default: ``AiohttpTransport``);
    tests pass ``httpx.MockTransport``-returning factories. ``source``: where ``config`` was read
    from, to read again on a reload (SIGHUP, ``--watch``, ``POST /pool/admin/reload``).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = Pool(config, initial_health=Health.LOADING)
        upstream = (transport or AiohttpTransport)(upstream_limits(config))
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(make_client(config, upstream))
            await stack.enter_async_context(pool)
            # The fleet's runtime changes, shared with the other processes (``[pool] state``).
            store = keys_store = None
            if config.state is not None:
                # redis, when used
                from local_inference_pool.pool.shared_keys import SharedKeys
                from local_inference_pool.pool.shared_overlay import SharedOverlay

                store, keys_store = SharedOverlay(config.state), SharedKeys(config.state)
                stack.push_async_callback(store.aclose)
                stack.push_async_callback(keys_store.aclose)
            tracing = tracing_for(config.telemetry)
            if tracing is not None:  # what is left is exported as the pool stops, after its tasks
                await stack.enter_async_context(tracing.running())
            group = await stack.enter_async_context(anyio.create_task_group())
            monitor = Monitor(pool, client, config)
            await group.start(monitor.run)
            accounting = KeyAccounting(config, store=keys_store)
            await group.start(accounting.run)
            requests = RequestLog(config.telemetry)
            stack.callback(requests.close)
            metrics = PoolMetrics(pool)
            runtime = Runtime(config, pool, client, upstream, monitor, metrics, accounting, requests, tracing)
            group.start_soon(runtime.traffic.sample_queues, pool.scheduler.queues.by_model)
            await group.start(ModelPlacer(runtime).run)
            changes = FleetChanges(runtime, source, install_routes, store=store)
            await group.start(changes.run)
            app.state.runtime, app.state.changes = runtime, changes
            try:
                yield
            finally:
                # Queued requests fail with 503 now; in-flight ones may finish within the grace.
                await pool.aclose(grace=runtime.config.shutdown_grace)
                app.state.runtime = app.state.changes = None
                group.cancel_scope.cancel()

    def install_routes(config: PoolConfig) -> None:
        """The routes for ``config`` (its ``[[routes]]`` after the built-in ones); a reload installs
        them anew when its routes changed, each request matching against the list of the moment."""
        if getattr(app.state, "route_config", None) == config.routes:
            return
        app.state.route_config = config.routes
        routes = routes_for(config)
        app.state.served = ", ".join(dict.fromkeys(route.path for route in routes))
        endpoints = [(route, RouteEndpoint(route)) for route in routes]
        app.plain_routes = {
            (method, route.path): endpoint
            for route, endpoint in endpoints
            if "{" not in route.path
            for method in route.methods
        }
        app.router.routes = [
            *(Route(route.path, endpoint, methods=list(route.methods)) for route, endpoint in endpoints),
            Route("/models", _models, methods=["GET"]),
            Route("/pool/status", _status, methods=["GET"]),
            Route("/pool/metrics", _metrics, methods=["GET"]),
            Route("/pool/", _dashboard, methods=["GET"]),
            Route("/pool/dashboard", _dashboard, methods=["GET"]),
            Route("/pool/requests", _recent_requests, methods=["GET"]),
            Route("/pool/traffic", _traffic, methods=["GET"]),
            Route("/pool/requests/{request_id}", _one_request, methods=["GET"]),
            *ADMIN_ROUTES,
        ]

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        anthropic = request.url.path.removeprefix(request.scope.get("root_path", "")).startswith("/messages")
        dialect = ANTHROPIC if anthropic else OPENAI
        if exc.status_code == 405:
            return dialect.error(
                405,
                f"{request.method} is not allowed on {request.url.path}",
                "invalid_request_error",
                "method_not_allowed",
            )
        return dialect.error(
            exc.status_code,
            f"no route {request.method} {request.url.path}; this endpoint serves {app.state.served}, "
            "/models and /pool/status",
            "invalid_request_error",
            "not_found",
        )

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PoolError)
        return error_response(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return openai_error(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")

    app = PoolApp(
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, PoolError: refused, Exception: unexpected},
    )
    install_routes(config)
    app.router.redirect_slashes = False  # a redirect would name the client's Host header back to it
    app.state.runtime = app.state.changes = None
    app.state.config = config
    return app


def create_standalone_app(
    config: PoolConfig,
    *,
    transport: TransportFactory | None = None,
    source: ConfigSource | None = None,
) -> PoolMiddleware:
    """What ``local-inference-pool serve`` runs: the pool at ``/v1``, its lifespan run, nothing else.

    A thin path dispatch rather than a Starlette ``Mount``: a second Starlette app would wrap every
    request and every streamed chunk in a second set of middleware.
    """
    return PoolMiddleware(_outside_the_pool, config, path="/v1", transport=transport, source=source)


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
            # ASGI's convention, as Starlette's Mount keeps it: ``path`` stays whole, ``root_path``
            # says where the app is mounted, so answers name the path the client sent.
            child = dict(scope)
            child["root_path"] = scope.get("root_path", "") + self.path
            await self.pool_app(child, receive, send)
            return
        await self.app(scope, receive, send)


# --- routes --------------------------------------------------------------------------------


_NOT_STARTED = (
    "the pool is not running: its lifespan was not started. When mounting it, create the host "
    "with lifespan=pool_lifespan(pool_app); for a host without a lifespan (Django), wrap it in "
    "PoolMiddleware(host_app, config)"
)


def _not_started() -> JSONResponse:
    return openai_error(503, _NOT_STARTED, "service_unavailable", "pool_not_started")


def _runtime(request: Request) -> Runtime | Response:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    return _not_started() if runtime is None else runtime


def _authorized(request: Request, config: PoolConfig, *, browser: bool = False) -> bool:
    return authorized(authorization(request.scope["headers"]), config, browser=browser)


def _unauthorized(*, browser: bool = False, dialect: Dialect = OPENAI) -> JSONResponse:
    how = "'x-api-key: <key>' or " if dialect is ANTHROPIC else ""
    response = dialect.error(
        401,
        f"missing or invalid API key: send {how}'Authorization: Bearer <key>' with one of the pool's keys",
        "invalid_request_error",
        "invalid_api_key",
    )
    if browser:  # lets a browser ask for the key (any user name, the key as password)
        response.headers["www-authenticate"] = 'Basic realm="local-inference-pool"'
    return response


class RouteEndpoint:
    """One route of the table (``routes.py``) as a raw ASGI app: the gateway's hot path."""

    def __init__(self, route: RouteSpec) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: Runtime | None = scope["app"].state.runtime
        route = self.route
        dialect = route.dialect
        if runtime is None:
            await dialect.error(503, _NOT_STARTED, "service_unavailable", "pool_not_started")(
                scope, receive, send
            )
            return
        headers = dict(scope["headers"])
        record = RequestRecord(request_id=request_id(headers), model="-", route=route.path)
        try:
            holder = key_holder(dialect.credentials(scope["headers"]), runtime.config)
            if holder is None:
                await send_refusal(send, _unauthorized(dialect=dialect), record, runtime)
                return
            record.key = holder or "-"
            inbound, call = await _read_request(scope, receive, headers, runtime, route, holder)
            record.model = inbound.model or "-"
            # A name no backend serves (a typo, a probe) is charted as one, as the metrics count it,
            # so that clients cannot fill the charts' bounded set of models.
            runtime.traffic.arrived(record.model if runtime.pool.serves(record.model) else "(unknown)")
            if runtime.tracing is not None:
                runtime.tracing.start(record, scope["headers"], dialect.name)
            record.capture = runtime.requests.capture_for()
            if record.capture is not None:
                record.capture.take_request(scope["headers"], inbound.body)
            inbound.tenant = holder
            inbound.priority = key_priority(given_priority(headers), runtime.config, holder)
            await runtime.accounting.admit(
                holder, inbound, record, slot=route.slot, anthropic=dialect is ANTHROPIC
            )
            if inbound.asked:  # an alias or a fallback: the answer names the model asked for
                record.asked, record.alias = inbound.asked, inbound.alias
                record.fallback_from, record.fallback_reason = inbound.fallback_from, inbound.fallback_reason
                record.headers = [*record.headers, *served_headers(inbound)]
        except ClientGone:
            record.status, record.outcome = 499, "client_gone"
            runtime.finish(record)
            return
        except PoolError as exc:
            await send_refusal(send, dialect.error_for(exc), record, runtime)
            return
        record.model = inbound.model or "-"
        await forward(receive, send, runtime, call, inbound, record)


async def _read_request(
    scope: Scope,
    receive: Receive,
    headers: dict[bytes, bytes],
    runtime: Runtime,
    route: RouteSpec,
    holder: str,
) -> tuple[Inbound, Call]:
    """The checked request and how it goes upstream, by the route's kind; raises ``PoolError``."""
    config = runtime.config
    passed = tuple((name, headers[name]) for name in PASSED_HEADERS if name in headers)
    method = scope["method"]
    if route.model is ModelFrom.RESPONSE:
        response_id = scope["path_params"]["response_id"]
        backend = await _stored_at(runtime, response_id)
        body = await read_body(receive, headers, config) if method == "POST" else b""
        path = route.upstream.replace("{response_id}", quote(response_id, safe=""))
        content_type = b"application/json" if body else None
        inbound = Inbound(body, "", priority(headers), None)
        return inbound, Call(route, path, method, content_type, passed, pin=backend)
    if route.model is ModelFrom.FORM:
        inbound = await read_form(receive, headers, config)
        return inbound, Call(route, route.upstream, method, headers.get(b"content-type"), passed)
    inbound = await read_inbound(
        receive,
        headers,
        config,
        session_key=route.dialect.session_key,
        model_required=route.model is ModelFrom.BODY,
    )
    if not inbound.model:
        inbound.model = _only_model(runtime)
    if runtime.model_names:  # [[models]]: an alias, a fallback, params
        key = runtime.accounting.key(holder)
        as_configured(runtime, inbound, lambda model: key is None or key.allows(model))
    if route.slot:
        inbound.prompt = route.dialect.prompt(inbound.payload, inbound.model)
    pin = None
    previous = inbound.payload.get("previous_response_id") if route.remembers_response else None
    if previous is not None:
        pin = await _stored_at(runtime, previous)
    return inbound, Call(route, route.upstream, method, b"application/json", passed, pin=pin)


async def _stored_at(runtime: Runtime, response_id: object) -> str:
    """The backend that stores a response the pool relayed; 400 for what is not an id, 404 for one
    the pool never saw (or forgot after ``response_ttl``)."""
    if not isinstance(response_id, str) or not RESPONSE_ID.fullmatch(response_id):
        raise InvalidRequestError(
            f"{str(response_id)[:64]!r} is not a response id", code="invalid_response_id"
        )
    backend = await runtime.responses.backend_of(response_id)
    if backend is None:
        raise InvalidRequestError(
            f"no response {response_id!r} was made through this pool (or it expired after "
            f"{runtime.config.response_ttl:g}s)",
            status=404,
            code="response_not_found",
        )
    return backend


def _only_model(runtime: Runtime) -> str:
    """The model of a request that names none: the pool's only one."""
    models = runtime.pool.models()
    if len(models) == 1:
        return models[0]
    listed = ", ".join(models[:20]) + (", ..." if len(models) > 20 else "")
    raise InvalidRequestError(
        f"'model' is required here: this pool serves {len(models)} models ({listed or 'none yet'})",
        code="invalid_model",
    )


async def _models(request: Request) -> Response:
    runtime = _runtime(request)
    if isinstance(runtime, Response):
        return runtime
    holder = key_holder(authorization(request.scope["headers"]), runtime.config)
    if holder is None:
        return _unauthorized()
    key = runtime.accounting.key(holder)  # a key with a list of models sees only those
    served: dict[str, list[str]] = {}
    for backend in runtime.pool.scheduler.backends.values():
        if backend.health is Health.HEALTHY and backend.models:
            for model in backend.models:
                if key is None or key.allows(model):
                    served.setdefault(model, []).append(backend.name)
    for alias, model in runtime.model_names.exact_aliases().items():  # names clients may use too
        if model in served and alias not in served:
            served[alias] = served[model]
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "local-inference-pool",
            "backends": sorted(names),
            **model_facts(runtime.pool, runtime.model_names.canonical_of(model), names),
        }
        for model, names in sorted(served.items())
    ]
    return JSONResponse({"object": "list", "data": data})


def _observer(request: Request) -> Runtime | Response:
    """The runtime, for status, metrics and the dashboard: open when ``public_status`` is set, and
    to a user key or an admin key."""
    runtime = _runtime(request)
    if isinstance(runtime, Response):
        return runtime
    config = runtime.config
    if config.public_status or _authorized(request, config, browser=True) or _as_admin(request, config):
        return runtime
    return _unauthorized(browser=True)


def _as_admin(request: Request, config: PoolConfig) -> bool:
    """Whether the request carries an admin key (Bearer, or a browser's Basic password)."""
    if not config.admin_keys:
        return False
    try:
        header = authorization(request.scope["headers"])
    except PoolError:
        return False
    return admin_holder(header, config) is not None


async def _status(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    snapshot = runtime.pool.snapshot()
    lacking = runtime.routes.snapshot()
    for backend in snapshot["backends"]:
        backend["lacks_routes"] = lacking.get(backend["name"], [])
    if snapshot["shared_state"] is not None:
        with anyio.move_on_after(2):  # a status page never hangs on the store
            snapshot["shared_state"]["processes"] = await runtime.pool.processes()
    # The dashboard offers drain and undrain to an admin (the admin API checks the key again).
    admin = _as_admin(request, runtime.config)
    snapshot["key_limits"] = runtime.accounting.counted
    snapshot["traces"] = runtime.tracing.state() if runtime.tracing is not None else None
    snapshot["models"] = models_status(runtime.pool)
    snapshot["usage"] = None  # when the store cannot say it (with state) within the bound
    with anyio.move_on_after(2), contextlib.suppress(StateUnavailableError):
        snapshot["usage"] = await usage_summary(runtime.accounting)
    traffic = {**runtime.metrics.traffic(), **runtime.traffic.rates()}
    return JSONResponse({**snapshot, "traffic": traffic, "admin": admin})


async def _traffic(request: Request) -> Response:
    """The charts' series: ``?group=all`` (default), ``backend:<name>`` or ``model:<name>``."""
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    return JSONResponse(runtime.traffic.series(request.query_params.get("group", "all")[:300]))


async def _recent_requests(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    capture = runtime.config.telemetry.capture
    return JSONResponse({"object": "list", "capture": capture, "data": runtime.requests.entries()})


async def _one_request(request: Request) -> Response:
    """One recent request's entry; its captured bodies to an admin key (to any key that may see
    the status when there are no admin keys): they hold other keys' prompts."""
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    config = runtime.config
    bodies = _as_admin(request, config) if config.admin_keys else True
    entry = runtime.requests.detail(request.path_params["request_id"], bodies=bodies)
    if entry is None:
        return openai_error(
            404, "no such request among the recent ones", "invalid_request_error", "request_not_found"
        )
    return JSONResponse(entry)


async def _metrics(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _dashboard(request: Request) -> Response:
    runtime = _observer(request)
    if isinstance(runtime, Response):
        return runtime
    if "admin" in request.query_params and not _as_admin(request, runtime.config):
        # ``?admin``: the browser asks for an admin key (as the password), and the page, whose
        # requests then carry it, offers the admin's buttons.
        response = _unauthorized(browser=True)
        response.headers["www-authenticate"] = 'Basic realm="local-inference-pool admin"'
        return response
    return HTMLResponse(_dashboard_page(), headers={"cache-control": "no-cache"})


def _dashboard_page() -> str:
    """The page, with the charting library it draws with (uPlot, in ``dashboard/vendor``) inlined:
    one answer, no CDN, so it works offline."""
    folder = resources.files("local_inference_pool.gateway").joinpath("dashboard")
    vendor = folder.joinpath("vendor")
    library = (
        f"<style>{vendor.joinpath('uPlot.min.css').read_text(encoding='utf-8')}</style>\n"
        f"<script>{vendor.joinpath('uPlot.iife.min.js').read_text(encoding='utf-8')}</script>"
    )
    return folder.joinpath("index.html").read_text(encoding="utf-8").replace("<!-- uPlot -->", library, 1)
