"""LM Studio (BACKENDS.md section 2). It answers 200 to unknown paths, so nothing is trusted blindly."""

from __future__ import annotations

from typing import Any

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends.base import Snapshot, positive_int
from local_inference_pool.upstream.backends.openai import auth_headers

# How it continues a partial answer: it documents no way, so it is not asked to.
CONTINUES: dict[str, dict[str, object]] = {}


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    headers = auth_headers(backend.api_key)
    response = await client.get(f"{backend.url}/api/v0/models", headers=headers)
    response.raise_for_status()
    body: Any = response.json()
    entries = body.get("data") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise ValueError("GET /api/v0/models: no 'data' list (is this LM Studio?)")
    entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
    models = [e["id"] for e in entries]
    resident = [e["id"] for e in entries if e.get("state") == "loaded"]
    return Snapshot(
        Health.HEALTHY,
        models=models,
        resident=resident,
        slots=await _parallel(client, backend, headers),
        model_info={entry["id"]: _facts(entry) for entry in entries},
        loads_models=True,
    )


def _facts(entry: dict[str, Any]) -> dict[str, Any]:
    """What LM Studio says of a model: its context (as loaded, else its maximum), tool use
    (``capabilities``), and its type (``vlm`` takes images; ``embeddings``)."""
    facts: dict[str, Any] = {}
    length = positive_int(entry.get("loaded_context_length")) or positive_int(entry.get("max_context_length"))
    if length is not None:
        facts["context_length"] = length
    capabilities = entry.get("capabilities")
    if isinstance(capabilities, list):
        facts["tools"] = "tool_use" in capabilities
    kind = entry.get("type")
    if isinstance(kind, str):
        facts["vision"] = kind == "vlm"
        facts["embeddings"] = kind == "embeddings"
    return facts


async def _parallel(client: httpx.AsyncClient, backend: BackendConfig, headers: dict[str, str]) -> int | None:
    """Max concurrent predictions of the loaded instances, from REST v1 (0.4.0+), when it answers."""
    response = await client.get(f"{backend.url}/api/v1/models", headers=headers)
    body: Any = response.json() if response.status_code == 200 else None
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        return None
    parallel = [
        instance.get("config", {}).get("parallel")
        for model in body["models"]
        if isinstance(model, dict)
        for instance in model.get("loaded_instances") or []
        if isinstance(instance, dict)
    ]
    values = [p for p in parallel if isinstance(p, int) and p > 0]
    return max(values) if values else None


def looks_like(greeting: Any) -> bool:
    return isinstance(greeting, dict) and greeting.get("lmstudio") is True
