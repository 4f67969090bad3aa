"""The simulator's answers: one generated reply in the shape of each API (OpenAI chat, completions and
Responses, Anthropic's Messages), whole or as stream events, with the usage and llama.cpp timings a
real server reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Reply"]


@dataclass
class Reply:
    kind: str
    model: str
    tokens: int
    prompt_tokens: int
    cached: int
    start: int = 0  # the first token's number: a continued answer goes on from the prefill's
    prefill: str = ""  # echoed first, as llama-server does (whitespace normalised)
    prompt_seconds: float = 0.0  # evaluating the uncached prompt
    id: str = field(default_factory=lambda: f"sim{time.monotonic_ns()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.id}", "object": obj, "created": self.created, "model": self.model}

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }

    def timings(self) -> dict[str, Any]:
        return {
            "cache_n": self.cached,
            "prompt_n": self.prompt_tokens - self.cached,
            "prompt_ms": round(self.prompt_seconds * 1000, 3),
            "predicted_n": self.tokens,
        }

    @property
    def text(self) -> str:
        return self.prefill + "".join(f"tok{i} " for i in range(self.start, self.start + self.tokens))

    def anthropic_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens - self.cached,
            "cache_read_input_tokens": self.cached,
            "output_tokens": self.tokens,
        }

    def responses_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
            "input_tokens_details": {"cached_tokens": self.cached},
        }

    def message(self, *, text: str, done: bool) -> dict[str, Any]:
        usage = self.anthropic_usage() if done else {**self.anthropic_usage(), "output_tokens": 0}
        return {
            "id": f"msg_{self.id}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}] if done else [],
            "model": self.model,
            "stop_reason": "max_tokens" if done else None,
            "stop_sequence": None,
            "usage": usage,
        }

    def response(self, *, done: bool) -> dict[str, Any]:
        output = [
            {
                "type": "message",
                "id": f"msg_{self.id}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": self.text, "annotations": []}],
            }
        ]
        return {
            "id": f"resp_{self.id}",
            "object": "response",
            "created_at": self.created,
            "status": "completed" if done else "in_progress",
            "model": self.model,
            "output": output if done else [],
            "usage": self.responses_usage() if done else None,
        }

    def opening_events(self) -> list[tuple[str, dict[str, Any]]]:
        if self.kind == "message":
            return [
                ("message_start", {"type": "message_start", "message": self.message(text="", done=False)}),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
            ]
        return [
            ("response.created", {"type": "response.created", "response": self.response(done=False)}),
            ("response.in_progress", {"type": "response.in_progress", "response": self.response(done=False)}),
        ]

    def delta_event(self, text: str) -> tuple[str, dict[str, Any]]:
        if self.kind == "message":
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            return "content_block_delta", delta
        return "response.output_text.delta", {
            "type": "response.output_text.delta",
            "item_id": f"msg_{self.id}",
            "output_index": 0,
            "content_index": 0,
            "delta": text,
        }

    def closing_events(self) -> list[tuple[str, dict[str, Any]]]:
        if self.kind == "message":
            return [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                        "usage": {"output_tokens": self.tokens},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        return [("response.completed", {"type": "response.completed", "response": self.response(done=True)})]

    def whole(self) -> dict[str, Any]:
        text = self.text
        if self.kind == "message":
            return self.message(text=text, done=True)
        if self.kind == "response":
            return self.response(done=True)
        if self.kind == "chat.completion":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
        return {
            **self._base(self.kind),
            "choices": [choice],
            "usage": self.usage(),
            "timings": self.timings(),
        }

    def chunk(
        self, *, role: bool = False, text: str | None = None, finish: bool = False, timings: bool = False
    ) -> dict[str, Any]:
        if self.kind != "chat.completion":
            choice: dict[str, Any] = {
                "index": 0,
                "text": text or "",
                "finish_reason": "length" if finish else None,
            }
            chunk = {**self._base("text_completion"), "choices": [choice]}
        else:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": None}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": "length" if finish else None}
            chunk = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if timings:
            chunk["timings"] = self.timings()
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": self.usage(), "timings": self.timings()}
