"""Loading and unloading a model on a server that does it on request (BACKENDS.md 1.9, 2.3, 3.7).

- llama.cpp's router: ``POST /models/load`` and ``/models/unload`` answer at once and the change
  goes on; the router's model list says when it is done (``status.value``: ``loaded``, or
  ``unloaded`` with ``failed`` for a load that failed), so each call here watches it until then.
- LM Studio: ``POST /api/v1/models/load`` answers when the model is loaded (a model loaded
  already gets a second instance, so the pool loads only what its probe did not find loaded);
  ``/api/v1/models/unload`` takes the instance id, which for a model loaded once is its key.
- Ollama: ``POST /api/generate`` with no prompt loads the model (``done_reason: load``), and with
  ``keep_alive: 0`` unloads it. A load by the pool keeps the model until the pool unloads it
  (``keep_alive: -1``) when the pool unloads it by ``idle_unload``; else Ollama's own timer stands.

Each call ends when the change is done or raises ``ModelControlError``; the caller bounds it in
time. An answer that says the change was already made (loaded already, not loaded) counts as done.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.upstream.backends.openai import auth_headers

__all__ = ["KINDS", "ModelControlError", "load", "unload"]

KINDS = ("llamacpp", "lmstudio", "ollama")  # the kinds that can (llama.cpp in router mode only)
WATCH_INTERVAL = 0.25  # seconds between looks at a router's model list while a change goes on


class ModelControlError(Exception):
    """The server refused or failed the change; the message says what it answered."""


async def load(
    client: httpx.AsyncClient, backend: BackendConfig, kind: str, model_id: str, *, keep: bool = False
) -> None:
    """Load ``model_id`` on the backend. ``keep``: ask the server to keep it until it is unloaded
    (Ollama), because the pool unloads it itself."""
    headers = auth_headers(backend.api_key)
    if kind == "llamacpp":
        await _post(client, backend, headers, "/models/load", {"model": model_id}, done_if="already")
        await _watch_router(client, backend, headers, model_id, "loaded")
    elif kind == "lmstudio":
        await _post(client, backend, headers, "/api/v1/models/load", {"model": model_id})
    elif kind == "ollama":
        body: dict[str, Any] = {"model": model_id, **({"keep_alive": -1} if keep else {})}
        await _post(client, backend, headers, "/api/generate", body)
    else:
        raise ModelControlError(f"a {kind} server does not load models on request")


async def unload(client: httpx.AsyncClient, backend: BackendConfig, kind: str, model_id: str) -> None:
    """Unload ``model_id`` from the backend."""
    headers = auth_headers(backend.api_key)
    if kind == "llamacpp":
        await _post(client, backend, headers, "/models/unload", {"model": model_id}, done_if="not loaded")
        await _watch_router(client, backend, headers, model_id, "unloaded")
    elif kind == "lmstudio":  # an instance that is gone already: 404
        await _post(
            client, backend, headers, "/api/v1/models/unload", {"instance_id": model_id}, gone_ok=True
        )
    elif kind == "ollama":
        await _post(client, backend, headers, "/api/generate", {"model": model_id, "keep_alive": 0})
    else:
        raise ModelControlError(f"a {kind} server does not unload models on request")


async def _post(
    client: httpx.AsyncClient,
    backend: BackendConfig,
    headers: dict[str, str],
    path: str,
    body: dict[str, Any],
    *,
    done_if: str | None = None,
    gone_ok: bool = False,
) -> None:
    """POST the change; an answer that is no success raises, unless it is a 400 whose message
    says the change was made already (``done_if``) or, with ``gone_ok``, a 404."""
    response = await client.post(f"{backend.url}{path}", json=body, headers=headers)
    if response.is_success or (gone_ok and response.status_code == 404):
        return
    if done_if is not None and response.status_code == 400 and done_if in response.text.lower():
        return
    raise ModelControlError(f"POST {path} answered {response.status_code}: {response.text[:200]!r}")


async def _watch_router(
    client: httpx.AsyncClient, backend: BackendConfig, headers: dict[str, str], model_id: str, goal: str
) -> None:
    """Until the router's model list shows ``model_id`` in the ``goal`` state; a load that failed
    (``unloaded`` with ``failed``) raises."""
    while True:
        response = await client.get(f"{backend.url}/models", headers=headers)
        if response.is_success:
            status = _router_status(response.json(), model_id)
            if status.get("value") == goal:
                return
            if goal == "loaded" and status.get("value") == "unloaded" and status.get("failed"):
                code = status.get("exit_code")
                raise ModelControlError(f"the router failed to load {model_id!r} (exit code {code})")
        await anyio.sleep(WATCH_INTERVAL)


def _router_status(listing: Any, model_id: str) -> dict[str, Any]:
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("id") == model_id:
            status = entry.get("status")
            return status if isinstance(status, dict) else {}
    return {}
