"""vLLM (BACKENDS.md section 4): one model, always loaded; its own queue is read from /metrics."""

from __future__ import annotations

import re

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends.base import Snapshot, positive_int
from local_inference_pool.upstream.backends.openai import auth_headers, model_entries

# How it continues a partial answer: continue_final_message, with no new generation prompt.
CONTINUES: dict[str, dict[str, object]] = {
    "chat": {"continue_final_message": True, "add_generation_prompt": False}
}

_GAUGE = re.compile(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    headers = auth_headers(backend.api_key)
    health = await client.get(f"{backend.url}/health", headers=headers)
    if health.status_code == 503:
        return Snapshot(Health.UNHEALTHY, error="engine dead (503 from /health)")
    health.raise_for_status()
    entries = await model_entries(client, backend.url, backend.api_key)
    models = [entry["id"] for entry in entries]
    info = {
        entry["id"]: {"context_length": length}
        for entry in entries
        if (length := positive_int(entry.get("max_model_len"))) is not None
    }
    return Snapshot(
        Health.HEALTHY,
        models=models,
        resident=models,
        busy=await _busy(client, backend, headers),
        model_info=info,
    )


async def _busy(client: httpx.AsyncClient, backend: BackendConfig, headers: dict[str, str]) -> int | None:
    """Requests running plus waiting inside vLLM, so its capacity is judged by its own load."""
    response = await client.get(f"{backend.url}/metrics", headers=headers)
    if response.status_code != 200:
        return None
    values = [float(v) for _, v in _GAUGE.findall(response.text)]
    return round(sum(values)) if values else None


def looks_like(models_body: object) -> bool:
    data = models_body.get("data") if isinstance(models_body, dict) else None
    return isinstance(data, list) and any(isinstance(e, dict) and e.get("owned_by") == "vllm" for e in data)
