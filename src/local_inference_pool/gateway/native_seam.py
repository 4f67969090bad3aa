"""Rewrites llama-server's native ``/completion`` stream, which continues a client's answer from token
ids, into the client's own stream: OpenAI's chat chunks or completion chunks, or Anthropic's events.

The client's stream reads as one: the first stream's identity on every chunk, no second role chunk
or ``message_start``, Anthropic's open text block going on, one finish with the reason the server
gave (its ``stop_type``: ``limit``, ``word``, ``eos``), ``[DONE]`` once, and usage counted for the
client's request: the rendered prompt's tokens (not the prompt plus the pieces it was continued
from), and every token generated on both servers. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from local_inference_pool.gateway.failover import EventBuffer, Partial, events_in

__all__ = ["NativeSeam"]

_FINISH = {"limit": "length", "word": "stop", "eos": "stop"}
_STOP_REASON = {"limit": "max_tokens", "word": "stop_sequence", "eos": "end_turn"}


class NativeSeam:
    def __init__(
        self, partial: Partial, route: str, payload: Mapping[str, Any], *, prompt_tokens: int
    ) -> None:
        self.partial = partial
        self.route = route
        self.prompt_tokens = prompt_tokens
        options = payload.get("stream_options")
        self._include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self._events = EventBuffer()
        self._block = partial.block if partial.block_open else partial.block + 1
        self._block_open = partial.block_open
        self.ended = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for what the server sent (complete events only)."""
        out: list[bytes] = []
        for event in self._events.complete(chunk):
            for payload in events_in(event):
                out.extend(self._rewrite(payload))
        return b"".join(out)

    def _rewrite(self, payload: bytes) -> list[bytes]:
        if self.ended:
            return []
        try:
            chunk = json.loads(payload)
        except ValueError:
            return []  # not an event of this API: nothing the client could read
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk:
            self.ended = True
            return [self._error(chunk["error"])]
        text = chunk.get("content")
        out = [self._text(text)] if isinstance(text, str) and text else []
        if chunk.get("stop") is True:
            self.ended = True
            out.extend(self._finish(chunk))
        return out

    def _identity(self, kind: str) -> dict[str, Any]:
        return {"object": kind, **self.partial.first}

    def _text(self, text: str) -> bytes:
        if self.route == "/messages":
            opening = b""
            if not self._block_open:
                self._block_open = True
                block = {"type": "text", "text": ""}
                opening = _named(
                    {"type": "content_block_start", "index": self._block, "content_block": block}
                )
            delta = {"type": "text_delta", "text": text}
            return opening + _named({"type": "content_block_delta", "index": self._block, "delta": delta})
        if self.route == "/completions":
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
            return _sse({**self._identity("text_completion"), "choices": [choice]})
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        return _sse({**self._identity("chat.completion.chunk"), "choices": [choice]})

    def _finish(self, chunk: Mapping[str, Any]) -> list[bytes]:
        stop_type = str(chunk.get("stop_type") or "eos")
        predicted = chunk.get("tokens_predicted")
        generated = self.partial.pieces + (predicted if isinstance(predicted, int) else 0)
        timings = chunk.get("timings") if isinstance(chunk.get("timings"), dict) else None
        if self.route == "/messages":
            out = []
            if self._block_open:
                out.append(_named({"type": "content_block_stop", "index": self._block}))
            stopping = chunk.get("stopping_word") if stop_type == "word" else None
            delta = {
                "stop_reason": _STOP_REASON.get(stop_type, "end_turn"),
                "stop_sequence": stopping or None,
            }
            output = {"output_tokens": generated}
            out.append(_named({"type": "message_delta", "delta": delta, "usage": output}))
            out.append(_named({"type": "message_stop"}))
            return out
        cached = timings.get("cache_n") if timings is not None else None
        usage = {
            "completion_tokens": generated,
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + generated,
            "prompt_tokens_details": {
                "cached_tokens": min(cached, self.prompt_tokens) if isinstance(cached, int) else 0
            },
        }
        reason = _FINISH.get(stop_type, "stop")
        if self.route == "/completions":  # llama-server puts usage on the last chunk of this route
            choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": reason}
            last: dict[str, Any] = {**self._identity("text_completion"), "choices": [choice], "usage": usage}
            if timings is not None:
                last["timings"] = timings
            return [_sse(last), b"data: [DONE]\n\n"]
        identity = self._identity("chat.completion.chunk")
        finish: dict[str, Any] = {
            **identity,
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
        }
        if not self._include_usage and timings is not None:
            finish["timings"] = timings  # as llama-server: on the finish chunk when usage is not asked
        out = [_sse(finish)]
        if self._include_usage:  # as llama-server: a chunk of its own, with no choices
            tail: dict[str, Any] = {**identity, "choices": [], "usage": usage}
            if timings is not None:
                tail["timings"] = timings
            out.append(_sse(tail))
        out.append(b"data: [DONE]\n\n")
        return out

    def _error(self, error: Any) -> bytes:
        message = error.get("message") if isinstance(error, dict) else str(error)
        if self.route == "/messages":
            body = {"type": "error", "error": {"type": "api_error", "message": str(message)}}
            return _named(body)
        return _sse({"error": error if isinstance(error, dict) else {"message": str(message)}})


def _named(chunk: dict[str, Any]) -> bytes:
    """An Anthropic event: named by its type."""
    return f"event: {chunk.get('type')}\n".encode() + _sse(chunk)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
