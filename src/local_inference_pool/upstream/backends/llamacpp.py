"""llama.cpp ``llama-server``: single-model and router mode (BACKENDS.md section 1)."""

from __future__ import annotations

from typing import Any

import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends.base import Snapshot, positive_int
from local_inference_pool.upstream.backends.openai import auth_headers

# How it continues a partial answer by text (mid-stream failover), when it cannot by token ids
# (llamacpp_tokens.py): a trailing assistant message, on chat and on Anthropic's messages alike,
# and it echoes the prefill first (BACKENDS.md section 7.4).
CONTINUES: dict[str, dict[str, object]] = {"chat": {}, "messages": {}}


async def probe(client: httpx.AsyncClient, backend: BackendConfig) -> Snapshot:
    headers = auth_headers(backend.api_key)
    health = await client.get(f"{backend.url}/health", headers=headers)
    if health.status_code == 503 and is_loading(health):  # every path answers so until ready
        return Snapshot(Health.LOADING, error="loading the model (503 from /health)")
    health.raise_for_status()
    props_response = await client.get(f"{backend.url}/props", headers=headers)
    props: Any = props_response.json() if props_response.status_code == 200 else {}
    listing = await client.get(f"{backend.url}/v1/models", headers=headers)
    listing.raise_for_status()
    entries = [
        e for e in (listing.json().get("data") or []) if isinstance(e, dict) and isinstance(e.get("id"), str)
    ]
    models = [e["id"] for e in entries]
    if isinstance(props, dict) and props.get("role") == "router":
        # Router mode: one child per loaded model; /slots needs ?model=, so busy is not read here.
        resident = [e["id"] for e in entries if (e.get("status") or {}).get("value") == "loaded"]
        states = {e["id"]: _router_state(e.get("status")) for e in entries}
        return Snapshot(
            Health.HEALTHY,
            models=models,
            resident=resident,
            model_info={model: {"state": state} for model, state in states.items() if state is not None},
            loads_models=True,
        )
    slots = props.get("total_slots") if isinstance(props, dict) else None
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    context = positive_int(settings.get("n_ctx") if isinstance(settings, dict) else None)  # per slot
    facts: dict[str, Any] = {} if context is None else {"context_length": context}
    modalities = props.get("modalities") if isinstance(props, dict) else None
    if isinstance(modalities, dict) and isinstance(modalities.get("vision"), bool):
        facts["vision"] = modalities["vision"]
    return Snapshot(
        Health.HEALTHY,
        models=models,
        resident=models[:1],  # single-model mode: its one model is always loaded
        slots=slots if isinstance(slots, int) and slots > 0 else None,
        busy=await _busy_slots(client, backend, headers),
        context=context,
        model_info=dict.fromkeys(models, facts) if facts else {},
    )


ROUTER_STATES = ("unloaded", "loading", "loaded", "sleeping", "downloading")


def _router_state(status: Any) -> str | None:
    """A router's word on a model (BACKENDS.md 1.9): ``loaded``, ``loading``, ``unloaded``, ..."""
    value = status.get("value") if isinstance(status, dict) else None
    return value if value in ROUTER_STATES else None


async def _busy_slots(
    client: httpx.AsyncClient, backend: BackendConfig, headers: dict[str, str]
) -> int | None:
    """Slots processing now, from /slots (on by default; 501 when started with --no-slots)."""
    response = await client.get(f"{backend.url}/slots", headers=headers)
    if response.status_code != 200:
        return None
    slots = response.json()
    if not isinstance(slots, list):
        return None
    return sum(1 for s in slots if isinstance(s, dict) and (s.get("is_processing") or s.get("state") == 1))


def is_loading(response: httpx.Response) -> bool:
    """llama-server's answer on every path while its model loads: 503 "Loading model"."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    error = body.get("error")
    message = error.get("message", "") if isinstance(error, dict) else body.get("status", "")  # older builds
    return "loading" in str(message).lower()


def looks_like(props: Any) -> bool:
    return isinstance(props, dict) and ("total_slots" in props or props.get("role") == "router")
