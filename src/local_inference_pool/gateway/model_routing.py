"""A request's model as ``[[models]]`` says: the model an alias names, a fallback when that model
cannot serve it well now, and the model's ``params``.

In order: a name some backend serves is served as it is (never taken for an alias); an alias is
resolved (``ModelNames``); then, for a model with ``fallbacks``, the first of it and its fallbacks
(depth first) that can serve the request well now (``core.fitness``: a healthy server, a context
long enough for the prompt, an expected wait within its ``fallback_after``) serves it, skipping any
the client's key may not use; when none can, the model itself does, and its own error says why.
The prompt's length is estimated from the body (4 bytes a token), as the key limits' reservations
are. Finally the body is rewritten once: the model's name, and its params.
"""

from __future__ import annotations

from collections.abc import Callable

from local_inference_pool.core.fitness import unfit
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.gateway.runtime import Runtime
from local_inference_pool.pool import Pool

__all__ = ["as_configured", "served_headers"]

BYTES_PER_TOKEN = 4


def as_configured(runtime: Runtime, inbound: Inbound, allows: Callable[[str], bool]) -> None:
    """Apply ``[[models]]`` to ``inbound`` (see the module): its model, body, ``asked``, ``alias``,
    and ``fallback_from`` with its reason. ``allows``: whether the client's key may use a model."""
    names, pool = runtime.model_names, runtime.pool
    resolved = None if pool.serves(inbound.model) else names.resolve(inbound.model)
    model = inbound.model if resolved is None else resolved.model
    fallback_from = reason = ""
    if names.falls_back(model):
        tokens = len(inbound.body) // BYTES_PER_TOKEN
        candidates = names.candidates(model)
        first_reason = unfit_now(pool, model, tokens, candidates[0][1])
        if first_reason is not None:
            for candidate, wait_limit in candidates[1:]:
                if allows(candidate) and unfit_now(pool, candidate, tokens, wait_limit) is None:
                    fallback_from, reason, model = model, first_reason, candidate
                    break
    params = names.params_of(model)
    if model != inbound.model or params is not None:
        inbound.served_as(model, "" if resolved is None else resolved.alias, params)
        inbound.fallback_from, inbound.fallback_reason = fallback_from, reason


def unfit_now(pool: Pool, model: str, prompt_tokens: int, wait_limit: float | None) -> str | None:
    """Why ``model`` cannot serve a request well now (``unhealthy``, ``context``, ``wait``), or
    None, judged by each server's own word on the model's context where it gives one. This
    process's view: with ``state``, the requests other processes have waiting are not counted."""
    contexts = {
        backend.name: length
        for backend in pool.scheduler.table.serving.get(model, ())
        if isinstance(length := pool.backends.model_info(backend.name, model).get("context_length"), int)
    }
    return unfit(pool.scheduler, model, prompt_tokens, wait_limit, contexts)


def served_headers(inbound: Inbound) -> list[tuple[bytes, bytes]]:
    """What the answer says of the model that served another name: ``x-served-model``, and
    ``x-fallback-from`` with why (``model; reason``) when a fallback did."""
    headers = [(b"x-served-model", inbound.model.encode())]
    if inbound.fallback_from:
        headers.append((b"x-fallback-from", f"{inbound.fallback_from}; {inbound.fallback_reason}".encode()))
    return headers
