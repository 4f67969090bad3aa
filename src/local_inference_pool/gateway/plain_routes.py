"""The pool's Starlette app, with the route table's plain paths reached by one lookup.

Starlette passes every request through ``ServerErrorMiddleware``, ``ExceptionMiddleware`` and a
router that tries each route's pattern in turn: measured with the pool's routes, 6.9 µs per request
for ``/chat/completions`` (the first route), 8.9 µs for ``/messages`` and 19 µs for
``/audio/speech``, against 2.1 µs for each through a dictionary lookup, on the path every inference
request takes. So a request whose method and path name a route of the table
exactly goes straight to its endpoint; everything else (paths with parameters, other methods, the
pool's pages, errors) goes through Starlette as before.

What the skipped layers did is done here the same way: the endpoint sees the scope Starlette's router
would give it (``app``, ``router``, empty ``path_params``), and an exception it raises is answered by
the app's own exception handler for it, if no answer has started, and one that is not an HTTP or pool
error is raised on, as ``ServerErrorMiddleware`` does.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PoolApp", "route_path"]


class PoolApp(Starlette):
    """A Starlette app whose ``plain_routes`` ((method, path) to an ASGI endpoint) are served first."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plain_routes: dict[tuple[str, str], ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.plain_routes.get((scope["method"], route_path(scope)))
            if endpoint is not None:
                scope["app"] = self
                scope.setdefault("router", self.router)
                scope["path_params"] = {}
                await self._guarded(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _guarded(self, endpoint: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await endpoint(scope, receive, sending)
        except Exception as exc:
            handler = next(
                (
                    self.exception_handlers[kind]
                    for kind in type(exc).__mro__
                    if kind in self.exception_handlers
                ),
                None,
            )
            if handler is None:
                raise
            if not started:
                response = await handler(Request(scope, receive), exc)
                await response(scope, receive, send)
            if self.exception_handlers.get(Exception) is handler:
                raise  # as ServerErrorMiddleware does: the server logs it too


def route_path(scope: Scope) -> str:
    """The path below where the app is mounted (its ``root_path``), as Starlette's router reads it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path
