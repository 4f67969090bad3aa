"""Joins a replayed answer to the client's stream: the client's own request, sent again to another
backend, which generates the answer from its start (greedy decoding, or a seed, makes it the same
answer where the servers compute alike).

The part the client already got is checked, text against text, and not sent again; what follows goes
out with the first stream's identity. The replay goes through the client's own route because that is
the computation the first server made: the same prompt, processed the same way, then one token at a
time (llama-server's native route, given the same token ids, took the other side of a near tie in
our measurements). A replay that goes another way, or ends, before the text the client got raises
``SeamDiverged``, and nothing of it was sent. Usage is the replay's own: it counted every token.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
from typing import Any

from local_inference_pool.gateway.failover import EventBuffer, Partial, SeamDiverged, events_in

__all__ = ["ReplaySeam"]


class ReplaySeam:
    def __init__(self, partial: Partial, route: str) -> None:
        self.partial = partial
        self.route = route
        self._to_skip = partial.text  # the text the client got, still to be seen in the replay
        self._events = EventBuffer()

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for what the replay sent (complete events only)."""
        out: list[bytes] = []
        for event in self._events.complete(chunk):
            out.extend(self._rewrite(event))
        return b"".join(out)

    def _rewrite(self, event: bytes) -> list[bytes]:
        payloads = events_in(event)
        if not payloads:
            return [] if self._to_skip else [event]  # a comment or ping: as it came, after the cut
        if payloads[0].strip() == b"[DONE]":
            if self._to_skip:
                raise SeamDiverged("the replay ended before the text sent")
            return [b"data: [DONE]\n\n"]
        try:
            chunk = json.loads(payloads[0])
        except ValueError:
            return [] if self._to_skip else [event]
        if not isinstance(chunk, dict):
            return [] if self._to_skip else [event]
        if self.route == "/messages":
            return self._message(chunk)
        return self._openai(chunk)

    def _skip(self, text: str) -> str:
        """What of a replayed piece is new, once it is checked against the text the client got."""
        if text.startswith(self._to_skip):
            text, self._to_skip = text[len(self._to_skip) :], ""
            return text
        if self._to_skip.startswith(text):
            self._to_skip = self._to_skip[len(text) :]
            return ""
        raise SeamDiverged("the replay went another way than the text sent")

    def _openai(self, chunk: dict[str, Any]) -> list[bytes]:
        if "error" in chunk and self._to_skip:
            raise SeamDiverged(f"the replay failed: {chunk['error']}")
        chunk.update(self.partial.first)
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta")
        opening = isinstance(delta, dict) and "role" in delta and not delta.get("content")
        if opening and not choice.get("finish_reason"):
            return []  # the client had its role chunk from the first stream
        if not self._to_skip:
            return [_sse(chunk)]
        if self.route == "/completions":
            holder: dict[str, Any] = choice
            key = "text"
        else:
            delta = choice.get("delta")
            holder, key = (delta if isinstance(delta, dict) else {}), "content"
        text = holder.get(key)
        new = self._skip(text) if isinstance(text, str) and text else ""
        if self._to_skip:  # still inside what the client got: the role chunk, checked pieces
            if choice.get("finish_reason") or chunk.get("usage"):
                raise SeamDiverged("the replay ended before the text sent")
            return []
        holder[key] = new  # the piece that crosses the cut: its new part
        return [_sse(chunk)] if new or choice.get("finish_reason") else []

    def _message(self, chunk: dict[str, Any]) -> list[bytes]:
        kind = chunk.get("type")
        partial = self.partial
        if kind == "message_start":
            return []  # the client had its one message_start
        if kind == "content_block_start" and partial.block_open and chunk.get("index") == partial.block:
            return []  # the client's text block is open and goes on
        if not self._to_skip:
            return [_named(chunk)]
        if kind == "error" or kind in ("message_delta", "message_stop", "content_block_stop"):
            raise SeamDiverged("the replay ended before the text sent")
        delta = chunk.get("delta") if kind == "content_block_delta" else None
        if not isinstance(delta, dict) or delta.get("type") != "text_delta":
            return []  # message_start, the text block's start: the client has them
        delta["text"] = self._skip(str(delta.get("text") or ""))
        return [_named(chunk)] if delta["text"] else []


def _named(chunk: dict[str, Any]) -> bytes:
    """An Anthropic event: named by its type."""
    return f"event: {chunk.get('type')}\n".encode() + _sse(chunk)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
