"""Ollama (BACKENDS.md section 3). Its parallelism is a server setting it does not expose: configure slots."""

from __future__ import annotations

from typing import Any

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends.base import Snapshot, positive_int, with_latest_alias
from local_inference_pool.upstream.backends.openai import auth_headers

# How it continues a partial answer: a trailing assistant message (its maintainers, ollama#6778);
# its /v1/messages is not known to, so Anthropic streams are not continued there.
CONTINUES: dict[str, dict[str, object]] = {"chat": {}}


def _names(body: Any) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise ValueError("no 'models' list (is this Ollama?)")
    return [e["name"] for e in _entries(body)]


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    headers = auth_headers(backend.api_key)
    tags = await client.get(f"{backend.url}/api/tags", headers=headers)
    tags.raise_for_status()
    loaded = await client.get(f"{backend.url}/api/ps", headers=headers)
    loaded.raise_for_status()
    # /api/ps lists the longest-lived first, which is the best guess at "most recently used".
    return Snapshot(
        Health.HEALTHY,
        models=with_latest_alias(_names(tags.json())),
        resident=with_latest_alias(_names(loaded.json())),
        model_info=_facts(tags.json(), loaded.json()),
        loads_models=True,
    )


def _facts(tags: Any, loaded: Any) -> dict[str, dict[str, Any]]:
    """What Ollama says of its models without asking each one (``/api/show``): ``capabilities``
    in ``/api/tags`` (newer servers: ``tools``, ``vision``, ``embedding``), and the context a loaded
    model runs with in ``/api/ps`` (``context_length``, v0.9.7 and later)."""
    facts: dict[str, dict[str, Any]] = {}
    for entry in _entries(tags):
        capabilities = entry.get("capabilities")
        if isinstance(capabilities, list):
            facts[entry["name"]] = {
                "tools": "tools" in capabilities,
                "vision": "vision" in capabilities,
                "embeddings": "embedding" in capabilities,
            }
    for entry in _entries(loaded):
        length = positive_int(entry.get("context_length"))
        if length is not None:
            facts.setdefault(entry["name"], {})["context_length"] = length
    for name in list(facts):  # "llama3.2:latest" is also "llama3.2"
        if name.endswith(":latest"):
            facts[name[: -len(":latest")]] = facts[name]
    return facts


def _entries(body: Any) -> list[dict[str, Any]]:
    entries = body.get("models") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


def looks_like(root_text: str) -> bool:
    return "Ollama is running" in root_text
