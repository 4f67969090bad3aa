"""Fakes of each server kind, answering the shapes in ../shared/BACKENDS.md, behind one MockTransport."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx


@dataclass
class Server:
    kind: str  # llamacpp | router | lmstudio | ollama | vllm | openai
    models: list[str] = field(default_factory=lambda: ["m"])
    loaded: list[str] = field(default_factory=list)
    slots: int = 4
    busy: int = 0  # slots processing now, as the server reports them
    loading: bool = False
    down: bool = False
    hang: bool = False
    garbled: bool = False  # answers JSON of an unexpected shape
    paths: list[str] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)  # ("load" | "unload", model) asked
    load_polls: int = 0  # looks at a router's model list during which a load shows "loading"
    fail_loads: bool = False  # a router whose child exits as it loads
    _loading: dict[str, int] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # what each POST carried
    served: list[str] = field(default_factory=list)  # models of chats answered
    sent_cold: list[str] = field(default_factory=list)  # chats that came for a model not loaded

    def answer(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        self.paths.append(path)
        if self.garbled:
            return httpx.Response(200, json=["not", "an", "object"])
        if request.method == "POST":
            self.bodies.append(json.loads(request.content or b"{}"))
            return self._change(path, self.bodies[-1])
        handler = getattr(self, f"_{self.kind}")
        response: httpx.Response | None = handler(path)
        if response is not None:
            return response
        if self.kind == "lmstudio":  # LM Studio answers 200 to anything it does not know
            return httpx.Response(200, json={"error": f"Unexpected endpoint or method. (GET {path})"})
        return httpx.Response(404, text="404 page not found")

    def _change(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Loads and unloads as BACKENDS.md records each kind answering them."""
        model = str(body.get("model") or body.get("instance_id"))
        if path.endswith("/chat/completions"):
            (self.served if model in self.loaded else self.sent_cold).append(model)
            choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            return httpx.Response(
                200, json={"object": "chat.completion", "model": model, "choices": [choice]}
            )
        if self.kind == "router" and path in ("/models/load", "/models/unload"):
            if model not in self.models:
                error = {"code": 404, "message": "model is not found", "type": "not_found_error"}
                return httpx.Response(404, json={"error": error})
            loading = path == "/models/load"
            if loading == (model in self.loaded):
                message = "model is already loaded" if loading else "model is not loaded"
                return httpx.Response(400, json={"error": {"code": 400, "message": message}})
            self.changes.append(("load" if loading else "unload", model))
            if loading and self.fail_loads:
                self._loading[model] = -1
            elif loading:
                self._loading[model] = self.load_polls
            else:
                self.loaded.remove(model)
            return httpx.Response(200, json={"success": True})
        if self.kind == "lmstudio" and path in ("/api/v1/models/load", "/api/v1/models/unload"):
            if path.endswith("/load"):
                self.changes.append(("load", model))
                self.loaded.insert(0, model)
                return httpx.Response(200, json={"type": "llm", "instance_id": model, "status": "loaded"})
            self.changes.append(("unload", model))
            self.loaded.remove(model)
            return httpx.Response(200, json={"instance_id": model})
        if self.kind == "ollama" and path == "/api/generate" and "prompt" not in body:
            unloading = body.get("keep_alive") == 0
            self.changes.append(("unload" if unloading else "load", model))
            if unloading:
                self.loaded = [m for m in self.loaded if m != model]
            elif model not in self.loaded:
                self.loaded.insert(0, model)
            reason = "unload" if unloading else "load"
            return httpx.Response(
                200, json={"model": model, "response": "", "done": True, "done_reason": reason}
            )
        return httpx.Response(404, text="404 page not found")

    def _router_status(self, model: str) -> dict[str, Any]:
        """A router's word on a model; a look at the list moves a load on."""
        polls = self._loading.get(model)
        if polls is None:
            return {"value": "loaded" if model in self.loaded else "unloaded"}
        if polls < 0:
            del self._loading[model]
            return {"value": "unloaded", "failed": True, "exit_code": 1}
        if polls == 0:
            del self._loading[model]
            self.loaded.insert(0, model)
            return {"value": "loaded"}
        self._loading[model] = polls - 1
        return {"value": "loading"}

    def _models(self, **extra: Any) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", **extra} for m in self.models]}

    def _llamacpp(self, path: str) -> httpx.Response | None:
        if self.loading:
            return httpx.Response(
                503, json={"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            )
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/props":
            return httpx.Response(
                200,
                json={
                    "total_slots": self.slots,
                    "model_alias": self.models[0],
                    "default_generation_settings": {"n_ctx": 4096},
                    "modalities": {"vision": False, "video": False, "audio": False},
                },
            )
        if path == "/slots":
            return httpx.Response(
                200,
                json=[{"id": i, "n_ctx": 4096, "is_processing": i < self.busy} for i in range(self.slots)],
            )
        if path == "/v1/models":
            return httpx.Response(200, json=self._models(owned_by="llamacpp"))
        if path == "/":
            return httpx.Response(200, text="<!doctype html><title>llama.cpp</title>")
        return None

    def _router(self, path: str) -> httpx.Response | None:
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/props":
            return httpx.Response(200, json={"role": "router", "max_instances": 4, "model_path": "none"})
        if path in ("/v1/models", "/models"):
            data = [
                {"id": m, "object": "model", "owned_by": "llamacpp", "status": self._router_status(m)}
                for m in self.models
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        return None

    def _lmstudio(self, path: str) -> httpx.Response | None:
        if path == "/lmstudio-greeting":
            return httpx.Response(200, json={"lmstudio": True})
        if path == "/api/v0/models":
            data = [
                {  # as BACKENDS.md section 2 records it; the model's name says its type here
                    "id": m,
                    "object": "model",
                    "type": "embeddings" if "embed" in m else "vlm" if "-vl" in m else "llm",
                    "state": "loaded" if m in self.loaded else "not-loaded",
                    "max_context_length": 32768,
                    **({"loaded_context_length": 8192} if m in self.loaded else {}),
                    "capabilities": [] if "embed" in m else ["tool_use"],
                }
                for m in self.models
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/api/v1/models":
            models = [
                {
                    "key": m,
                    "type": "llm",
                    "loaded_instances": [{"id": m, "config": {"parallel": self.slots}}]
                    if m in self.loaded
                    else [],
                }
                for m in self.models
            ]
            return httpx.Response(200, json={"models": models})
        if path == "/v1/models":
            return httpx.Response(200, json=self._models(owned_by="organization_owner"))
        return None

    def _ollama(self, path: str) -> httpx.Response | None:
        if path == "/":
            return httpx.Response(200, text="Ollama is running")
        if path == "/api/version":
            return httpx.Response(200, json={"version": "0.12.3"})
        if path == "/api/tags":  # a newer server's: with capabilities (BACKENDS.md 3.2)
            entries = [
                {
                    "name": m,
                    "model": m,
                    "capabilities": ["embedding"] if "embed" in m else ["completion", "tools"],
                }
                for m in self.models
            ]
            return httpx.Response(200, json={"models": entries})
        if path == "/api/ps":  # context_length since v0.9.7 (BACKENDS.md 3.3)
            return httpx.Response(
                200,
                json={
                    "models": [
                        {"name": m, "model": m, "size_vram": 1, "context_length": 4096} for m in self.loaded
                    ]
                },
            )
        if path == "/v1/models":
            return httpx.Response(200, json=self._models(owned_by="library"))
        return None

    def _vllm(self, path: str) -> httpx.Response | None:
        if path == "/health":
            return httpx.Response(200)
        if path == "/version":
            return httpx.Response(200, json={"version": "0.10.1"})
        if path == "/v1/models":
            return httpx.Response(200, json=self._models(owned_by="vllm", max_model_len=32768))
        if path == "/metrics":
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="{self.models[0]}"}} {self.busy}.0\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{engine="0",model_name="{self.models[0]}"}} 0.0\n'
            )
            return httpx.Response(200, text=text)
        return None

    def _openai(self, path: str) -> httpx.Response | None:
        if path == "/v1/models":
            return httpx.Response(200, json=self._models(owned_by="someone"))
        return None


class Servers:
    def __init__(self, **servers: Server) -> None:
        self.servers = servers

    def __getitem__(self, host: str) -> Server:
        return self.servers[host]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport())

    def transport(self, limits: httpx.Limits | None = None) -> httpx.MockTransport:
        """One transport for every server (an app's ``transport`` factory takes the limits)."""

        async def handle(request: httpx.Request) -> httpx.Response:
            server = self.servers[request.url.host]
            if server.hang:
                await anyio.sleep_forever()
            return server.answer(request)

        return httpx.MockTransport(handle)
