"""Backend adapters: one module per server kind, each turning HTTP answers into a ``Snapshot``.

``probe(client, backend, kind)`` asks a backend of a known kind; ``detect(client, backend)`` works out
the kind of an ``auto`` backend from what it answers (once; the caller remembers and logs it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.upstream.backends import llamacpp, lmstudio, ollama, openai, vllm
from local_inference_pool.upstream.backends.base import Snapshot

__all__ = ["DetectedKind", "Snapshot", "continues", "continues_by_tokens", "detect", "probe"]

DetectedKind = Literal["llamacpp", "lmstudio", "ollama", "vllm", "openai"]
Prober = Callable[[httpx.AsyncClient, BackendConfig], Awaitable[Snapshot]]

PROBES: dict[DetectedKind, Prober] = {
    "llamacpp": llamacpp.probe,
    "lmstudio": lmstudio.probe,
    "ollama": ollama.probe,
    "vllm": vllm.probe,
    "openai": openai.probe,
}


CONTINUES: dict[str, dict[str, dict[str, object]]] = {
    "llamacpp": llamacpp.CONTINUES,
    "lmstudio": lmstudio.CONTINUES,
    "ollama": ollama.CONTINUES,
    "vllm": vllm.CONTINUES,
    "openai": openai.CONTINUES,
}


def continues(kind: str, api: str) -> dict[str, object] | None:
    """What a backend of ``kind`` needs in the body to continue a partial answer of ``api``
    (``chat``, ``completions``, ``messages``), or None when it cannot: each adapter says. Every kind
    that continues chat continues a completion (the prompt plus the text so far)."""
    ways = CONTINUES.get(kind, {})
    if api == "completions":
        return {} if "chat" in ways else None
    return ways.get(api)


def continues_by_tokens(kind: str) -> bool:
    """Whether a backend of ``kind`` continues a partial answer from token ids (``llamacpp_tokens``):
    exactly where it stopped, whatever the chat template."""
    return kind == "llamacpp"


async def probe(client: httpx.AsyncClient, backend: BackendConfig, kind: DetectedKind) -> Snapshot:
    return await PROBES[kind](client, backend)


async def _json(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    response = await client.get(url, headers=headers)
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


async def detect(client: httpx.AsyncClient, backend: BackendConfig) -> DetectedKind:
    """A loading llama-server first (503 on every path), then LM Studio, which answers 200 to any
    path, so its greeting must be checked before the rest."""
    headers = openai.auth_headers(backend.api_key)
    health = await client.get(f"{backend.url}/health", headers=headers)
    if health.status_code == 503 and llamacpp.is_loading(health):
        return "llamacpp"  # it answers every path so while its model loads
    if lmstudio.looks_like(await _json(client, f"{backend.url}/lmstudio-greeting", headers)):
        return "lmstudio"
    if llamacpp.looks_like(await _json(client, f"{backend.url}/props", headers)):
        return "llamacpp"
    root = await client.get(f"{backend.url}/", headers=headers)
    if root.status_code == 200 and ollama.looks_like(root.text):
        return "ollama"
    listing = await client.get(f"{backend.url}/v1/models", headers=headers)
    listing.raise_for_status()  # nothing answered as any kind: let the caller retry later
    if vllm.looks_like(listing.json()):
        return "vllm"
    return "openai"
