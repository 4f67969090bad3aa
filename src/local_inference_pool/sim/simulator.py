"""A simulated llama.cpp ``llama-server``: the fake for the tests and the engine of the demo.

It answers the shapes of ../shared/BACKENDS.md (section 1): ``/health``, ``/props``, ``/slots``,
``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``. Like llama-server
it has N slots and queues requests beyond them inside itself (it never answers 503 for load), answers
503 "Loading model" on every path while it starts, and streams SSE chunks at a set token rate. It
remembers the prompts it was sent (with its answers, as a slot's KV cache holds them; at most
``cached_prompts`` of them, least recently used out, as llama.cpp's slots and host cache) and
reports the longest reused prefix, in whole messages, as
``usage.prompt_tokens_details.cached_tokens`` and ``timings.cache_n``; with
``prefill_tokens_per_second`` the rest of the prompt takes time before the first token, reported
as ``timings.prompt_ms``. So prompt-cache placement can be measured. Where it differs from llama-server: it may serve several models (loading one costs
``load_seconds``), and it has fault knobs (``faults``) for tests.

Refusing connections and dropping one before any header are faults of the listener, not of an ASGI
app (uvicorn answers 500 when an app fails before its response starts): stop the server, or point
the pool at a port nobody listens on.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from local_inference_pool.sim import native
from local_inference_pool.sim.answers import Reply
from local_inference_pool.sim.prompt_cache import PromptCache
from local_inference_pool.sim.slots import Slots, Stats
from local_inference_pool.sim.streams import Faults, Streams

__all__ = ["Faults", "SimulatedBackend", "SimulatorConfig"]


@dataclass(frozen=True)
class SimulatorConfig:
    models: tuple[str, ...] = ("sim-model",)
    slots: int = 2
    tokens_per_second: float = 200.0
    completion_tokens: int = 16  # when the request sets no max_tokens
    load_seconds: float = 0.0  # cost of switching to a model that is not loaded
    startup_seconds: float = 0.0  # answers 503 "Loading model" on every path until then
    max_loaded_models: int = 1
    api_key: str | None = None
    n_ctx: int = 4096
    chunk_padding: int = 0  # extra bytes in every streamed chunk, to fill sockets quickly in tests
    stateful_responses: bool = (
        False  # keeps responses, as LM Studio does: previous_response_id works here only
    )
    lacks: tuple[str, ...] = ()  # paths it answers 404 to, as a server without that route
    cached_prompts: int = 0  # prompts its cache holds (0: every one)
    prefill_tokens_per_second: float = 0.0  # 0: the prompt costs no time


class SimulatedBackend:
    """An ASGI app. ``peak_running`` is the most requests it ever ran at once (never above slots)."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.faults = Faults()
        self.stats = Stats()
        self._slots = Slots(
            self.stats,
            slots=self.config.slots,
            first_model=self.config.models[0],
            load_seconds=self.config.load_seconds,
            max_loaded=self.config.max_loaded_models,
        )
        self._streams = Streams(
            self.faults, self._slots, self.config.tokens_per_second, self.config.chunk_padding
        )
        self._started = time.monotonic()
        self._cache = PromptCache(self.config.cached_prompts)
        self.responses: dict[str, dict[str, Any]] = {}  # stored responses (stateful_responses)
        self._app = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/v1/health", self._health),
                Route("/props", self._props),
                Route("/slots", self._slots_route),
                Route("/models", self._models),
                Route("/v1/models", self._models),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/{response_id}", self._stored_response, methods=["GET", "DELETE"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/apply-template", self._apply_template, methods=["POST"]),
                Route("/completion", self._native_completion, methods=["POST"]),
                Route("/v1/audio/transcriptions", self._transcribe, methods=["POST"]),
                Route("/sim/stats", self._stats, methods=["GET"]),
            ]
        )

    @property
    def loaded(self) -> list[str]:
        """The models loaded now, most recently used first."""
        return self._slots.loaded

    @property
    def peak_running(self) -> int:
        return self.stats.peak

    def restart(self) -> None:
        """Begin a new start-up: 503 "Loading model" on every path for ``startup_seconds``."""
        self._started = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.config.lacks:
            await _error(404, "File Not Found", "not_found_error")(scope, receive, send)
            return
        if scope["type"] == "http":
            if self._loading():
                await _error(503, "Loading model", "unavailable_error")(scope, receive, send)
                return
            if self.config.api_key and scope["path"] not in (
                "/health",
                "/v1/health",
                "/models",
                "/v1/models",
            ):
                headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
                if headers.get("authorization") != f"Bearer {self.config.api_key}":
                    await _error(401, "Invalid API Key", "authentication_error")(scope, receive, send)
                    return
        await self._app(scope, receive, send)

    def _loading(self) -> bool:
        return time.monotonic() - self._started < self.config.startup_seconds

    # --- routes ----------------------------------------------------------------------------

    async def _stats(self, request: Request) -> Response:
        """Not llama.cpp's: what tests in another process need (peak concurrency above all)."""
        stats = self.stats
        return JSONResponse(
            {
                "running": stats.running,
                "peak_running": stats.peak,
                "requests": stats.requests,
                "completed": stats.completed,
                "model_loads": stats.model_loads,
            }
        )

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _props(self, request: Request) -> Response:
        return JSONResponse(
            {
                "default_generation_settings": {"n_ctx": self.config.n_ctx, "params": {"n_predict": -1}},
                "total_slots": self.config.slots,
                "model_alias": self.loaded[0],
                "model_path": f"/models/{self.loaded[0]}.gguf",
                "build_info": "simulator",
                "is_sleeping": False,
            }
        )

    async def _slots_route(self, request: Request) -> Response:
        busy = self.stats.running
        return JSONResponse(
            [
                {"id": i, "n_ctx": self.config.n_ctx, "speculative": False, "is_processing": i < busy}
                for i in range(self.config.slots)
            ]
        )

    async def _models(self, request: Request) -> Response:
        created = int(self._started)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "llamacpp", "aliases": [m]}
                    for m in self.config.models
                ],
            }
        )

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, "chat.completion")

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, "text_completion")

    async def _model_request(self, request: Request) -> tuple[dict[str, Any], str] | Response:
        """The JSON body and the model it names, or the error llama-server would answer."""
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model", self.config.models[0])
        if model not in self.config.models:
            return _error(404, f"model '{model}' not found", "invalid_request_error")
        return body, model

    async def _embeddings(self, request: Request) -> Response:
        parsed = await self._model_request(request)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        items = body.get("input", "")
        inputs = items if isinstance(items, list) else [items]
        async with self._slots.slot(model):
            data = [
                {"object": "embedding", "index": i, "embedding": _vector(str(v))}
                for i, v in enumerate(inputs)
            ]
        tokens = sum(len(str(v)) // 4 + 1 for v in inputs)
        return JSONResponse(
            {
                "object": "list",
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # --- other APIs: Anthropic Messages, OpenAI Responses, llama.cpp's tokenize, audio ------------

    async def _messages(self, request: Request) -> Response:
        """Anthropic's Messages API, as llama-server serves it (named events when streamed)."""
        return await self._generate(request, "message")

    async def _count_tokens(self, request: Request) -> Response:
        parsed = await self._model_request(request)
        if isinstance(parsed, Response):
            return parsed
        return JSONResponse({"input_tokens": self._prompt_cache(parsed[0], remember=False)[0]})

    async def _responses(self, request: Request) -> Response:
        """OpenAI's Responses API; with ``stateful_responses``, a ``previous_response_id`` must be
        one this server made (LM Studio's behaviour)."""
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        previous = body.get("previous_response_id")
        if self.config.stateful_responses and previous is not None and previous not in self.responses:
            return _error(404, f"response '{previous}' not found", "invalid_request_error")
        return await self._generate(request, "response")

    async def _stored_response(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        stored = self.responses.get(response_id) if self.config.stateful_responses else None
        if stored is None:
            return _error(404, f"response '{response_id}' not found", "invalid_request_error")
        if request.method == "DELETE":
            del self.responses[response_id]
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        return JSONResponse(stored)

    async def _tokenize(self, request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        tokens = native.tokenize(body.get("content", ""), add_special=bool(body.get("add_special")))
        return JSONResponse({"tokens": tokens})

    async def _apply_template(self, request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        return JSONResponse({"prompt": native.render(body.get("messages"))})

    async def _native_completion(self, request: Request) -> Response:
        """llama-server's native route: a prompt of text or token ids, ``n_predict``."""
        return await self._generate(request, "native")

    async def _transcribe(self, request: Request) -> Response:
        async with request.form(max_part_size=16 * 1024 * 1024) as form:
            model = form.get("model")
            upload = form.get("file")
            if not isinstance(model, str) or model not in self.config.models:
                return _error(404, f"model '{model}' not found", "invalid_request_error")
            size = len(await upload.read()) if upload is not None and not isinstance(upload, str) else 0
        async with self._slots.slot(model):
            await anyio.sleep(0.01)
        return JSONResponse({"text": f"{size} bytes of audio heard by {model}"})

    # --- generation ------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: str) -> Response:
        self.stats.requests += 1
        self.stats.seen_headers.append({k.lower(): v for k, v in request.headers.items()})
        parsed = await self._model_request(request)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        faults = self.faults
        if faults.delay_headers:
            await anyio.sleep(faults.delay_headers)
        if faults.hang:
            await anyio.sleep_forever()
        if faults.status is not None:
            return _error(faults.status, f"simulated failure {faults.status}", "server_error")
        tokens = int(
            body.get("max_tokens")
            or body.get("max_output_tokens")
            or body.get("n_predict")
            or self.config.completion_tokens
        )
        prompt_tokens, cached = self._prompt_cache(body, remember=False)
        if kind == "native" and isinstance(body.get("prompt"), list):
            prompt_tokens = len(body["prompt"])
        start, prefill = _continues(kind, body)
        rate = self.config.prefill_tokens_per_second
        reply = Reply(
            kind=kind,
            model=model,
            tokens=tokens,
            prompt_tokens=prompt_tokens,
            cached=cached,
            start=start,
            prefill=prefill,
            prompt_seconds=(prompt_tokens - cached) / rate if rate > 0 else 0.0,
        )
        if kind == "response" and self.config.stateful_responses:
            self.responses[f"resp_{reply.id}"] = reply.whole()
        self._remember(body, reply)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if kind in ("message", "response"):
                stream = self._streams.named(reply)
            elif kind == "native":
                stream = self._streams.native(reply)
            else:
                stream = self._streams.openai(reply, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        left = False
        async with self._slots.slot(model), anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                # As llama-server: a client that closes its connection cancels its generation.
                nonlocal left
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                left = True
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            await self._streams.evaluate_prompt(reply)
            await anyio.sleep(tokens / self.config.tokens_per_second)
            group.cancel_scope.cancel()
        if left:
            self.stats.abandoned += 1
            return Response(status_code=499)
        self.stats.completed += 1
        return JSONResponse(reply.whole())

    def _prompt_cache(self, body: dict[str, Any], *, remember: bool = True) -> tuple[int, int]:
        return self._cache.look_up(body, remember=remember)

    def _remember(self, body: dict[str, Any], reply: Reply) -> None:
        """Its cache holds the prompt and, after it, the answer, as the next turn sends it back."""
        messages = body.get("messages")
        if isinstance(messages, list):
            body = {**body, "messages": [*messages, {"role": "assistant", "content": reply.text}]}
        self._prompt_cache(body)


_TOKEN = re.compile(r"tok\d+")


def _continues(kind: str, body: dict[str, Any]) -> tuple[int, str]:
    """Where a continued answer starts: every prompt yields tok0, tok1, ... (deterministic), and a
    prefill (a trailing assistant message, or a prompt ending in generated text) that holds N of
    them goes on from tokN. A chat answer echoes the prefill, whitespace normalised."""
    if kind == "text_completion":
        return len(_TOKEN.findall(str(body.get("prompt", "")))), ""
    if kind == "native":
        return native.start_of(body.get("prompt", "")), ""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if kind in ("chat.completion", "message") and isinstance(last, dict) and last.get("role") == "assistant":
        content = str(last.get("content") or "")
        if content.strip():
            return len(_TOKEN.findall(content)), content.strip() + " "
    return 0, ""


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255, 4) for b in digest[:8]]


def _error(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": status, "message": message, "type": error_type}}, status_code=status
    )


async def _json_body(request: Request) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _error(400, "the request body is not valid JSON", "invalid_request_error")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object", "invalid_request_error")
    return body
