"""Whether a model can serve a request well now, or why not: what a fallback to another model
(``[[models]] fallbacks``) is decided on. A view of the scheduler's state; it changes nothing.

Three reasons, in the order they are checked:

- ``unhealthy``: no backend that serves the model is healthy (or all of them are draining);
- ``context``: the prompt is longer than the context of every healthy backend, as its server
  says it (llama.cpp per slot; LM Studio, vLLM and Ollama per model); a model one of whose servers
  says nothing is not judged on it;
- ``wait``: the expected wait for a slot is longer than the model's ``fallback_after``. The
  requests waiting for the model, beyond the free slots, are taken in turn by its slots, each
  lease lasting its backend's mean (learned from the leases that ended); a model whose leases have
  not been timed yet is not judged on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from local_inference_pool.core.model import Backend, Health

if TYPE_CHECKING:
    from local_inference_pool.core.scheduler import Scheduler

__all__ = ["expected_wait", "unfit", "wait_on"]


def unfit(
    scheduler: Scheduler,
    model: str,
    prompt_tokens: int,
    wait_limit: float | None,
    contexts: Mapping[str, int] | None = None,
) -> str | None:
    """Why ``model`` cannot serve a request of ``prompt_tokens`` well now, or None if it can.
    ``contexts``: the model's context on some backends, as their servers say it per model (else a
    backend's own context per slot counts)."""
    healthy = _serving(scheduler, model)
    if not healthy:
        return "unhealthy"
    given = contexts or {}
    contexts_now = [given.get(backend.name) or backend.context for backend in healthy]
    known = [context for context in contexts_now if context]
    if known and len(known) == len(healthy) and prompt_tokens > max(known):
        return "context"
    if wait_limit is not None:
        wait = expected_wait(scheduler, model)
        if wait is not None and wait > wait_limit:
            return "wait"
    return None


def expected_wait(scheduler: Scheduler, model: str) -> float | None:
    """Seconds a request for ``model`` arriving now is expected to wait for a slot (0 when one is
    free), or None when its backends' leases have not been timed yet."""
    return wait_on(scheduler, model, _serving(scheduler, model))


def wait_on(scheduler: Scheduler, model: str, backends: Sequence[Backend]) -> float | None:
    """Seconds a request for ``model`` arriving now waits for a slot on ``backends``: its requests
    beyond their free slots, taken in turn by their slots, each lease lasting the backends' learned
    mean (0 when a slot is free; None without backends, or before any lease there ended)."""
    slots = sum(backend.slots for backend in backends)
    if slots == 0:
        return None
    busy = sum(min(backend.slots, backend.active_total + backend.external_busy) for backend in backends)
    ahead = scheduler.queues.by_model.get(model, 0) - (slots - busy)
    if ahead < 0:
        return 0.0
    timed = [backend.lease_seconds.value for backend in backends if backend.lease_seconds.value is not None]
    if not timed:
        return None
    return (ahead // slots + 1) * (sum(timed) / len(timed))


def _serving(scheduler: Scheduler, model: str) -> list[Backend]:
    """The backends that may take a request for ``model`` now: healthy, not draining."""
    return [
        backend
        for backend in scheduler.table.serving.get(model, ())
        if backend.health is Health.HEALTHY and not backend.draining and not backend.removed
    ]
