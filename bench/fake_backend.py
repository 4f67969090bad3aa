"""A fast fake OpenAI-style backend for the gateway benchmarks: raw ASGI, no framework.

    python bench/fake_backend.py --port 9001 [--slots 256] [--tokens-per-second 0] [--answer-ms 0] [--model bench]

Non-streaming chat answers at once (or after ``--answer-ms``); streaming sends ``max_tokens`` SSE chunks, as fast as it can
(rate 0) or at the set rate. It answers the llama.cpp probes the pool uses (/health, /props,
/v1/models) and keeps its peak concurrency at GET /stats, so a benchmark can check that no gateway
ever sent it more than its slots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import uvicorn

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","model":"bench","choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
JSON = [(b"content-type", b"application/json")]
ANSWER_HEADERS = [*JSON, (b"content-length", str(len(ANSWER)).encode())]


class FakeBackend:
    def __init__(
        self, slots: int, tokens_per_second: float, answer_ms: float = 0.0, model: str = "bench"
    ) -> None:
        self.slots = slots
        self.model = model
        self.answer_delay = answer_ms / 1000
        self.delay = 1 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.running = 0
        self.peak = 0
        self.served = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET":
            body = {
                "/health": {"status": "ok"},
                "/props": {"total_slots": self.slots},
                "/v1/models": {
                    "object": "list",
                    "data": [{"id": self.model, "object": "model", "owned_by": "bench"}],
                },
                "/stats": {"running": self.running, "peak": self.peak, "served": self.served},
            }.get(path)
            await send({"type": "http.response.start", "status": 200 if body else 404, "headers": JSON})
            await send({"type": "http.response.body", "body": json.dumps(body or {}).encode()})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(raw or b"{}")
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if request.get("stream"):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")],
                    }
                )
                for _ in range(int(request.get("max_tokens", 16))):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            else:
                if self.answer_delay:
                    await asyncio.sleep(self.answer_delay)
                # With its length, as llama-server, vLLM and Ollama send a non-streaming answer.
                await send({"type": "http.response.start", "status": 200, "headers": ANSWER_HEADERS})
                await send({"type": "http.response.body", "body": ANSWER})
        finally:
            self.running -= 1
            self.served += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument(
        "--answer-ms", type=float, default=0.0, help="time to a non-streaming answer (0: at once)"
    )
    parser.add_argument("--model", default="bench", help="the model it lists")
    args = parser.parse_args()
    app = FakeBackend(args.slots, args.tokens_per_second, args.answer_ms, args.model)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        http="httptools",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
