"""The generic OpenAI-compatible API, which every supported server also speaks."""

from __future__ import annotations

from typing import Any

import httpx

from local_inference_pool.backends.base import Snapshot
from local_inference_pool.config import BackendConfig
from local_inference_pool.scheduler import Health


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(client: httpx.AsyncClient, url: str, api_key: str | None = None) -> list[str]:
    """Model ids from ``GET {url}/v1/models``. Raises httpx errors, or ValueError on a malformed body."""
    response = await client.get(f"{url}/v1/models", headers=auth_headers(api_key))
    response.raise_for_status()
    body: Any = response.json()
    items = body.get("data") if isinstance(body, dict) else None
    if items is None and isinstance(body, dict) and "data" in body:
        return []  # Ollama answers "data": null when it has no models
    if not isinstance(items, list):
        raise ValueError(f"GET {url}/v1/models: the body has no 'data' list")
    return [item["id"] for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    """Any OpenAI-compatible server: reachable and listing models is all it can say."""
    return Snapshot(Health.HEALTHY, models=await list_models(client, backend.url, backend.api_key))
