"""The generic OpenAI-compatible API, which every supported server also speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends.base import Snapshot

# How a plain OpenAI-compatible server continues a partial answer: unknown (it may start anew).
CONTINUES: dict[str, dict[str, object]] = {}

# A request to a server failed: it could not be reached, answered an error, or answered nonsense.
REQUEST_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, ValueError)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(client: httpx.AsyncClient, url: str, api_key: str | None = None) -> list[str]:
    """Model ids from ``GET {url}/v1/models``. Raises httpx errors, or ValueError on a malformed body."""
    return [entry["id"] for entry in await model_entries(client, url, api_key)]


async def model_entries(
    client: httpx.AsyncClient, url: str, api_key: str | None = None
) -> list[dict[str, Any]]:
    """The entries of ``GET {url}/v1/models`` that have an id. Raises httpx errors, or ValueError
    on a malformed body."""
    response = await client.get(f"{url}/v1/models", headers=auth_headers(api_key))
    response.raise_for_status()
    body: Any = response.json()
    items = body.get("data") if isinstance(body, dict) else None
    if items is None and isinstance(body, dict) and "data" in body:
        return []  # Ollama answers "data": null when it has no models
    if not isinstance(items, list):
        raise ValueError(f"GET {url}/v1/models: the body has no 'data' list")
    return [item for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]


async def warm(client: httpx.AsyncClient, url: str, api_key: str | None, model: str, prompt: str) -> None:
    """A one-token chat completion, so that the model is loaded. Raises httpx errors."""
    response = await client.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
        headers=auth_headers(api_key),
    )
    response.raise_for_status()


def describe_http_error(exc: BaseException) -> str:
    """A short text for a failed request, in the v0.7 style: ``HTTP 401`` or the error itself."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def client_or(
    client: httpx.AsyncClient | None, *, connect_timeout: float, read_timeout: float | None
) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, or a short-lived one that ignores proxy environment variables."""
    if client is not None:
        yield client
        return
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as owned:
        yield owned


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    """Any OpenAI-compatible server: reachable and listing models is all it can say."""
    return Snapshot(Health.HEALTHY, models=await list_models(client, backend.url, backend.api_key))
