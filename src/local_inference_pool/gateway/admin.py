"""The admin API under the mount: the fleet's backends and client keys, changed while the pool
serves, and what the keys used (``/pool/usage``).

Off unless ``[pool] admin_keys`` is set. An admin key is sent as ``Authorization: Bearer <key>``
(a browser may send it as a Basic password, for the dashboard's buttons); it is compared in
constant time with every admin key, and a user key is refused with 403. JSON in and out, errors in
OpenAI's shape; every change goes through ``FleetChanges``, which validates it as the config file
is validated and logs who made it.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import PoolError
from local_inference_pool.gateway.changes import ChangeRefused, FleetChanges
from local_inference_pool.gateway.inbound import authorization, key_holder
from local_inference_pool.gateway.key_changes import KeyChanges
from local_inference_pool.gateway.replies import openai_error
from local_inference_pool.gateway.usage_report import usage_endpoint

__all__ = ["ADMIN_ROUTES", "admin_holder"]

logger = logging.getLogger(__name__)

MAX_ADMIN_BODY = 64 * 1024


def admin_holder(header: str, config: PoolConfig) -> str | None:
    """Which admin key the ``Authorization`` header carries (``admin_keys[i]``), or None."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    elif scheme.lower() != "bearer":
        return None
    given = token.strip().encode()
    if not given:
        return None
    # Every key is compared, so the time taken does not say which one came close.
    matches = [
        f"admin_keys[{index}]"
        for index, key in enumerate(config.admin_keys)
        if hmac.compare_digest(given, key.encode())
    ]
    return matches[0] if matches else None


def _refused(status: int, message: str, code: str) -> Response:
    error_type = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error"}
    response = openai_error(status, message, error_type.get(status, "invalid_request_error"), code)
    if status == 401:
        response.headers["www-authenticate"] = 'Bearer realm="local-inference-pool admin"'
    return response


def _admin(request: Request) -> tuple[FleetChanges, str] | Response:
    """The fleet's changes and who asks, or the refusal: the API off (404), no admin key (401), a
    user's key (403), the pool not running (503)."""
    changes: FleetChanges | None = getattr(request.app.state, "changes", None)
    runtime = getattr(request.app.state, "runtime", None)
    if changes is None or runtime is None:
        return openai_error(503, "the pool is not running", "service_unavailable", "pool_not_started")
    config: PoolConfig = runtime.config
    if not config.admin_keys:
        return _refused(
            404, "the admin API is off: set [pool] admin_keys (or LIP_ADMIN_KEYS) to turn it on", "admin_off"
        )
    try:
        header = authorization(request.scope["headers"])
    except PoolError as exc:
        return _refused(400, exc.message, exc.code or "invalid_request")
    who = admin_holder(header, config)
    if who is None:
        if header and key_holder(header, config, browser=True):  # '' when the pool has no user keys
            return _refused(403, "a user key may not use the admin API; send an admin key", "not_admin")
        return _refused(
            401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'", "invalid_admin_key"
        )
    client = request.client.host if request.client else "?"
    return changes, f"{who} from {client}"


async def _json(request: Request) -> Any:
    """The request's JSON body, at most ``MAX_ADMIN_BODY`` bytes; raises ``ChangeRefused``."""
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_ADMIN_BODY:
                raise ChangeRefused(413, f"the body is over {MAX_ADMIN_BODY} bytes", "body_too_large")
    except ClientDisconnect:
        raise ChangeRefused(400, "the client left before its body was read", "client_gone") from None
    try:
        return json.loads(body) if body else {}
    except (ValueError, RecursionError):
        raise ChangeRefused(400, "the body is not valid JSON", "invalid_json") from None


AdminCall = Callable[[Request, FleetChanges, str], Awaitable[Any]]


def _endpoint(call: AdminCall, status: int = 200) -> Callable[[Request], Awaitable[Response]]:
    """An admin route: the key checked, the call made with the fleet's changes and who asks, its
    result answered as JSON, a refused change answered with its status."""

    async def endpoint(request: Request) -> Response:
        admin = _admin(request)
        if isinstance(admin, Response):
            return admin
        try:
            result = await call(request, *admin)
        except ChangeRefused as refused:
            return _refused(refused.status, str(refused), refused.code)
        if isinstance(result, Response):
            return result
        return JSONResponse(result, status_code=status)

    return endpoint


async def _list(request: Request, changes: FleetChanges, who: str) -> Any:
    await changes.catch_up()  # what was changed through another process a moment ago is listed too
    return {"object": "list", "data": changes.backends()}


async def _add(request: Request, changes: FleetChanges, who: str) -> Any:
    entry = await _json(request)
    if not isinstance(entry, dict):
        raise ChangeRefused(
            400, "expected a JSON object with the keys of a [[backends]] entry", "invalid_backend"
        )
    ttl = entry.pop("ttl", None)
    name = entry.get("name")
    renewal = isinstance(name, str) and any(b["name"] == name for b in changes.backends())
    return JSONResponse(await changes.add(entry, ttl=ttl, who=who), status_code=200 if renewal else 201)


async def _patch(request: Request, changes: FleetChanges, who: str) -> Any:
    return await changes.patch(request.path_params["name"], await _json(request), who=who)


async def _drain(request: Request, changes: FleetChanges, who: str) -> Any:
    return await changes.drain(request.path_params["name"], who=who)


async def _undrain(request: Request, changes: FleetChanges, who: str) -> Any:
    return await changes.undrain(request.path_params["name"], who=who)


async def _remove(request: Request, changes: FleetChanges, who: str) -> Any:
    return await changes.remove(request.path_params["name"], who=who)


async def _reload(request: Request, changes: FleetChanges, who: str) -> Any:
    reset = request.query_params.get("reset", "false").lower() in ("1", "true", "yes")
    return await changes.reload(reset=reset, who=who, fleet_wide=True)


async def _keys(request: Request, changes: FleetChanges, who: str) -> Any:
    await changes.catch_up()
    return {"object": "list", "data": KeyChanges(changes).keys()}


async def _add_key(request: Request, changes: FleetChanges, who: str) -> Any:
    return JSONResponse(await KeyChanges(changes).add(await _json(request), who=who), status_code=201)


async def _patch_key(request: Request, changes: FleetChanges, who: str) -> Any:
    return await KeyChanges(changes).patch(request.path_params["name"], await _json(request), who=who)


async def _rotate_key(request: Request, changes: FleetChanges, who: str) -> Any:
    return await KeyChanges(changes).rotate(request.path_params["name"], who=who)


async def _remove_key(request: Request, changes: FleetChanges, who: str) -> Any:
    return await KeyChanges(changes).remove(request.path_params["name"], who=who)


async def _usage(request: Request, changes: FleetChanges, who: str) -> Any:
    return await usage_endpoint(request, request.app.state.runtime.accounting)


ADMIN_ROUTES = (
    Route("/pool/admin/backends", _endpoint(_list), methods=["GET"]),
    Route("/pool/admin/backends", _endpoint(_add), methods=["POST"]),
    Route("/pool/admin/backends/{name}", _endpoint(_patch), methods=["PATCH"]),
    Route("/pool/admin/backends/{name}", _endpoint(_remove), methods=["DELETE"]),
    Route("/pool/admin/backends/{name}/drain", _endpoint(_drain), methods=["POST"]),
    Route("/pool/admin/backends/{name}/undrain", _endpoint(_undrain), methods=["POST"]),
    Route("/pool/admin/reload", _endpoint(_reload), methods=["POST"]),
    Route("/pool/admin/keys", _endpoint(_keys), methods=["GET"]),
    Route("/pool/admin/keys", _endpoint(_add_key), methods=["POST"]),
    Route("/pool/admin/keys/{name}", _endpoint(_patch_key), methods=["PATCH"]),
    Route("/pool/admin/keys/{name}", _endpoint(_remove_key), methods=["DELETE"]),
    Route("/pool/admin/keys/{name}/rotate", _endpoint(_rotate_key), methods=["POST"]),
    Route("/pool/usage", _endpoint(_usage), methods=["GET"]),
)
