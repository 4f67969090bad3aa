"""What the pool says of its models, from what their servers say: the facts ``/v1/models`` lists
with each model, and the ``models`` of ``/pool/status``, each with its servers and its state there.

A server's state for a model is ``loading`` or ``unloading`` while the pool (any process of it)
loads or unloads it there; else the server's own word where it gives one (llama.cpp's router: ``loaded``,
``loading``, ``unloaded``, ``sleeping``, ``downloading``); else ``loaded`` when the model is among
those it has loaded (a single-model llama-server's and vLLM's one model, LM Studio's ``loaded``,
Ollama's ``/api/ps``), ``unloaded`` when the server says which it has loaded and this is not one,
and ``available`` when it does not say (a generic OpenAI server).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from local_inference_pool.core.model import Health
from local_inference_pool.pool import Pool

__all__ = ["model_facts", "models_status"]


def model_facts(pool: Pool, model: str, backends: Iterable[str]) -> dict[str, Any]:
    """What ``/v1/models`` says of a model, from what its servers say: ``context_length`` (the
    longest), and ``capabilities`` (``tools``, ``vision``, ``embeddings``: any server that says so).
    Only what some server said: a fact no server reports is left out."""
    contexts: list[int] = []
    capabilities: set[str] = set()
    for backend in backends:
        facts = pool.backends.model_info(backend, model)
        if isinstance(facts.get("context_length"), int):
            contexts.append(facts["context_length"])
        capabilities.update(name for name in ("tools", "vision", "embeddings") if facts.get(name) is True)
    out: dict[str, Any] = {}
    if contexts:
        out["context_length"] = max(contexts)
    if capabilities:
        out["capabilities"] = sorted(capabilities)
    return out


def models_status(pool: Pool) -> dict[str, Any]:
    """Each model some backend serves: its servers with their health and the model's state there,
    and its replicas (the healthy servers that have it loaded)."""
    models: dict[str, dict[str, Any]] = {}
    for backend in pool.scheduler.backends.values():
        if backend.removed or not backend.models:
            continue
        for model in sorted(backend.models):
            reported = pool.backends.model_info(backend.name, model).get("state")
            if model in backend.changing:  # the pool's own load or unload there, or another process's
                state = backend.changing[model]
            elif isinstance(reported, str):
                state = reported
            elif model in backend.resident:
                state = "loaded"
            else:
                state = "unloaded" if backend.residency_known else "available"
            entry = models.setdefault(model, {"servers": {}, "replicas": 0})
            entry["servers"][backend.name] = {"state": state, "health": backend.health.value}
            if state == "loaded" and backend.health is Health.HEALTHY:
                entry["replicas"] += 1
    return dict(sorted(models.items()))
