"""A stand-in for Ollama (which cannot be installed here), over real HTTP, answering as
../shared/BACKENDS.md section 3 records: ``/`` says it runs, ``/api/tags`` and ``/api/ps`` list its
model, and its OpenAI-compatible ``/v1/chat/completions`` answers (streamed as SSE, ending with
``[DONE]``) under the model's Ollama name. It takes a while per answer, as a server would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class OllamaFake:
    model: str = "gemma3:270m"
    seconds: float = 0.3  # per answer
    asked: list[str] = field(default_factory=list)  # the model of each chat it was sent

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self._root),
                Route("/api/version", self._version),
                Route("/api/tags", self._tags),
                Route("/api/ps", self._ps),
                Route("/v1/models", self._models),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.12.3"})

    async def _tags(self, request: Request) -> Response:
        entry = {"name": self.model, "model": self.model, "capabilities": ["completion"]}
        return JSONResponse({"models": [entry]})

    async def _ps(self, request: Request) -> Response:
        entry = {"name": self.model, "model": self.model, "size_vram": 1, "context_length": 4096}
        return JSONResponse({"models": [entry]})

    async def _models(self, request: Request) -> Response:
        entry = {"id": self.model, "object": "model", "created": 1746405464, "owned_by": "library"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def _chat(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        self.asked.append(str(body.get("model")))
        if body.get("model") != self.model:  # as Ollama answers a model it does not have
            error = {"message": f"model '{body.get('model')}' not found", "type": "api_error"}
            return JSONResponse({"error": error}, status_code=404)
        await anyio.sleep(self.seconds)
        base = {"id": "chatcmpl-1", "created": 1, "model": self.model, "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Hello from Ollama."}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            for text, finish in (("Hello", None), (" from Ollama.", "stop")):
                delta = {"role": "assistant", "content": text}
                chunk = {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
