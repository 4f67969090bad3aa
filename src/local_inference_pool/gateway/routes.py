"""Every route the pool serves under its mount, as data: one line per route says where the backend
serves it, how the request's model is found, whether it takes a slot, and its API family (the shape
of the pool's own errors). ``[[routes]]`` in the config adds routes of the same kinds.

Also what the pool learns about its backends' routes: a backend that answers 404 or 405 to a route
it was sent (a server without ``/v1/messages``, an Ollama asked for ``/tokenize``) lacks it for a
while, and requests for that route go to the model's other backends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from local_inference_pool.config import PoolConfig
from local_inference_pool.gateway.dialects import ANTHROPIC, DIALECTS, OPENAI, RESPONSES, Dialect

__all__ = ["ROUTES", "ModelFrom", "RouteSpec", "RouteSupport", "routes_for"]


class ModelFrom(StrEnum):
    BODY = "body"  # the JSON body's "model", required
    OPTIONAL = "optional"  # the JSON body's "model", or the pool's only model
    FORM = "form"  # a multipart form's "model" field
    RESPONSE = "response"  # none: the backend that created the response named in the path


@dataclass(frozen=True, slots=True)
class RouteSpec:
    path: str  # under the mount; "{response_id}" names a stored response
    upstream: str  # the backend's path; "{response_id}" is filled in
    methods: tuple[str, ...] = ("POST",)
    model: ModelFrom = ModelFrom.BODY
    slot: bool = True
    dialect: Dialect = OPENAI
    remembers_response: bool = False  # its answer's id names the backend that stores the response
    optional: bool = True  # a backend of the model may lack it (every one serves chat completions)

    @property
    def learns(self) -> bool:
        """Whether a 404/405 here says the backend lacks the route: not on routes every backend
        serves (there a 404 is about the request) nor where it says a stored response is unknown."""
        return self.optional and self.model is not ModelFrom.RESPONSE


_R: Final = "/v1/responses/{response_id}"
ROUTES: Final = (
    RouteSpec("/chat/completions", "/v1/chat/completions", optional=False),
    RouteSpec("/completions", "/v1/completions", optional=False),
    RouteSpec("/embeddings", "/v1/embeddings", optional=False),
    RouteSpec("/messages", "/v1/messages", dialect=ANTHROPIC),
    RouteSpec("/messages/count_tokens", "/v1/messages/count_tokens", slot=False, dialect=ANTHROPIC),
    RouteSpec("/responses", "/v1/responses", dialect=RESPONSES, remembers_response=True),
    RouteSpec("/responses/{response_id}", _R, ("GET", "DELETE"), ModelFrom.RESPONSE, False, RESPONSES),
    RouteSpec(
        "/responses/{response_id}/cancel", _R + "/cancel", ("POST",), ModelFrom.RESPONSE, False, RESPONSES
    ),
    RouteSpec(
        "/responses/{response_id}/input_items",
        _R + "/input_items",
        ("GET",),
        ModelFrom.RESPONSE,
        False,
        RESPONSES,
    ),
    RouteSpec("/rerank", "/v1/rerank", model=ModelFrom.OPTIONAL),
    RouteSpec("/reranking", "/v1/rerank", model=ModelFrom.OPTIONAL),
    # llama-server serves these at its root (/v1/tokenize is 404 there).
    RouteSpec("/infill", "/infill", model=ModelFrom.OPTIONAL),
    RouteSpec("/tokenize", "/tokenize", model=ModelFrom.OPTIONAL, slot=False),
    RouteSpec("/detokenize", "/detokenize", model=ModelFrom.OPTIONAL, slot=False),
    RouteSpec("/apply-template", "/apply-template", model=ModelFrom.OPTIONAL, slot=False),
    RouteSpec("/audio/transcriptions", "/v1/audio/transcriptions", model=ModelFrom.FORM),
    RouteSpec("/audio/translations", "/v1/audio/translations", model=ModelFrom.FORM),
    RouteSpec("/audio/speech", "/v1/audio/speech"),
)


def routes_for(config: PoolConfig) -> tuple[RouteSpec, ...]:
    """The built-in routes, then the config's ``[[routes]]`` (a path of both: the config's wins)."""
    extra = tuple(
        RouteSpec(r.path, r.upstream, model=ModelFrom(r.model), slot=r.slot, dialect=DIALECTS[r.dialect])
        for r in config.routes
    )
    replaced = {route.path for route in extra}
    return tuple(route for route in ROUTES if route.path not in replaced) + extra


class RouteSupport:
    """Which backends lack which upstream paths, learned from their answers and forgotten after
    ``forget_after`` seconds (a server may be upgraded, or started with ``--reranking``). Bounded by
    backends times routes."""

    def __init__(self, *, forget_after: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.forget_after = forget_after
        self._clock = clock
        self._lacking: dict[tuple[str, str], float] = {}  # (backend, upstream path) -> until

    def mark_lacking(self, backend: str, upstream: str) -> None:
        self._lacking[(backend, upstream)] = self._clock() + self.forget_after

    def lacks(self, backend: str, upstream: str) -> bool:
        until = self._lacking.get((backend, upstream))
        if until is None:
            return False
        if until <= self._clock():
            del self._lacking[(backend, upstream)]
            return False
        return True

    def lacking(self, upstream: str) -> set[str]:
        """The backends known to lack ``upstream`` now."""
        return {
            backend
            for (backend, path) in list(self._lacking)
            if path == upstream and self.lacks(backend, path)
        }

    def snapshot(self) -> dict[str, list[str]]:
        """Per backend, the upstream paths it is known to lack now."""
        shown: dict[str, list[str]] = {}
        for backend, path in sorted(self._lacking):
            if self.lacks(backend, path):
                shown.setdefault(backend, []).append(path)
        return shown
