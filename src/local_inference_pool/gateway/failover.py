"""Continuing a stream whose backend died: what the client got so far, whether another backend can
continue it faithfully, the request that continues it by text, and the seam between the two streams.

Pure functions over bytes and JSON, no I/O: ``midstream`` decides when and how, the relay records and
rewrites. OpenAI's streamed ``/chat/completions`` and ``/completions``, and Anthropic's ``/messages``.
llama-server continues by token ids instead (``native_seam``, ``llamacpp_tokens``), and by text
only where that fails.

- Chat by text: the original messages plus a trailing assistant message with the text so far, and
  what the backend's kind needs besides (each adapter says, ``backends.continues``: llama-server and
  Ollama continue a trailing assistant message; vLLM needs ``continue_final_message``; LM Studio and
  plain OpenAI-compatible servers are not asked).
- Completions by text: the prompt plus the text so far (no echo).
- Messages (Anthropic's) by text: the messages plus a trailing assistant message, which llama-server
  continues on ``/v1/messages`` (and echoes); other kinds are not used for it. The client's event
  sequence stays valid: no second ``message_start``, the open text block goes on (indices continue).
- The token budget left: ``max_tokens`` less the content pieces already sent (a piece is a token in
  llama.cpp's streams; elsewhere near enough).
- Not continued, because it could not be faithful: a tool call under way, a reasoning block open,
  constrained output (``response_format``, ``grammar``, ``json_schema``, guided decoding), ``n > 1``,
  ``logprobs``, completions' ``echo``/``suffix``, or more relayed than ``MAX_RECORDED``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

__all__ = [
    "API",
    "MAX_RECORDED",
    "EventBuffer",
    "Partial",
    "Recorder",
    "Seam",
    "SeamDiverged",
    "StreamSeam",
    "continuation",
    "events_in",
    "read_partial",
    "refusal",
]

MAX_RECORDED: Final = 4 << 20  # bytes of a stream kept to continue it; longer ones are not
API: Final = {"/chat/completions": "chat", "/completions": "completions", "/messages": "messages"}
_CONSTRAINED: Final = (
    "response_format",
    "grammar",
    "json_schema",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    "guided_choice",
)


class Recorder:
    """The bytes of a stream relayed so far, up to ``MAX_RECORDED`` (then nothing: too long)."""

    __slots__ = ("buffer", "overflow")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.overflow = False

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if len(self.buffer) + len(chunk) > MAX_RECORDED:
            self.overflow = True
            self.buffer = bytearray()
            return
        self.buffer += chunk


class StreamSeam(Protocol):
    """Joins a continuation's stream to the client's: what to send for each chunk that came (or
    ``SeamDiverged``: the continuation cannot be joined, and nothing of it was sent)."""

    def feed(self, chunk: bytes) -> bytes: ...


class SeamDiverged(Exception):
    """A replayed answer went another way than the one the client got, before any of it was sent."""


class EventBuffer:
    """The complete events in a stream's chunks, which may cut an event anywhere (any of SSE's
    line endings; an event is returned with its blank line, as ``\n\n``)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def complete(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            events.append(bytes(self._buffer[: end + 2]))
            del self._buffer[: end + 2]
        return events


@dataclass
class Partial:
    """What the client got of a stream before it broke."""

    text: str = ""
    pieces: int = 0  # content pieces sent: the tokens emitted, near enough
    texts: list[str] = field(default_factory=list)  # those pieces, one by one
    first: dict[str, Any] = field(default_factory=dict)  # id, created, model, system_fingerprint, object
    finished: bool = False  # its finish_reason or [DONE] went out: nothing to continue
    refusal: str | None = None  # why it cannot be continued faithfully
    block: int = -1  # messages: the index of the last content block the client saw start
    block_open: bool = False  # messages: that block has not stopped


def refusal(payload: Mapping[str, Any], route: str) -> str | None:
    """Why a request's stream could not be continued faithfully on another backend, or None."""
    if not payload.get("stream"):
        return "not streamed"
    if route not in ("/chat/completions", "/completions", "/messages"):
        return "route"
    if any(payload.get(key) for key in _CONSTRAINED):
        return "constrained output"
    n = payload.get("n")
    if n is not None and n != 1:
        return "n > 1"
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "logprobs"
    if route == "/completions" and (
        payload.get("echo") or payload.get("suffix") or not isinstance(payload.get("prompt"), str)
    ):
        return "prompt shape"
    if route in ("/chat/completions", "/messages") and not isinstance(payload.get("messages"), list):
        return "messages shape"
    return None


def events_in(data: bytes) -> list[bytes]:
    """The ``data:`` payloads of the complete events in ``data`` (any of SSE's line endings)."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    payloads = []
    for event in text.split(b"\n\n")[:-1]:  # the last part is unfinished (or empty)
        lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if lines:
            payloads.append(b"\n".join(lines))
    return payloads


def read_partial(data: bytes, route: str) -> Partial:
    """The text, pieces and identity of a broken stream, and whether it may be continued."""
    if route == "/messages":
        return _read_messages(data)
    partial = Partial()
    texts: list[str] = []
    for payload in events_in(data):
        if payload.strip() == b"[DONE]":
            partial.finished = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if not partial.first:
            partial.first = {
                k: chunk[k] for k in ("id", "created", "model", "system_fingerprint", "object") if k in chunk
            }
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        if choice.get("finish_reason"):
            partial.finished = True
        if route == "/completions":
            piece = choice.get("text")
        else:
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            if delta.get("tool_calls") or delta.get("function_call"):
                partial.refusal = "tool call in progress"
            if delta.get("reasoning_content") or delta.get("reasoning"):
                partial.refusal = "reasoning open"  # until content starts, the answer is all reasoning
            piece = delta.get("content")
            if piece and partial.refusal == "reasoning open":
                partial.refusal = None  # the reasoning block closed: content follows it
        if isinstance(piece, str) and piece:
            texts.append(piece)
            partial.pieces += 1
    partial.texts = texts
    partial.text = "".join(texts)
    return partial


def _read_messages(data: bytes) -> Partial:
    partial = Partial()
    texts: list[str] = []
    for payload in events_in(data):
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "message_start" and isinstance(event.get("message"), dict):
            partial.first = {"message": event["message"]}
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            partial.block, partial.block_open = int(event.get("index", 0)), True
            if block.get("type") in ("tool_use", "server_tool_use"):
                partial.refusal = "tool call in progress"
            elif block.get("type") in ("thinking", "redacted_thinking"):
                partial.refusal = "reasoning open"
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                texts.append(delta["text"])
                partial.pieces += 1
        elif kind == "content_block_stop":
            partial.block_open = False
            if partial.refusal == "reasoning open":
                partial.refusal = None  # the thinking block closed
        elif kind in ("message_stop",) or (
            kind == "message_delta" and (event.get("delta") or {}).get("stop_reason")
        ):
            partial.finished = True
    partial.texts = texts
    partial.text = "".join(texts)
    return partial


def continuation(
    payload: Mapping[str, Any], partial: Partial, route: str, extra: Mapping[str, Any] | None
) -> bytes | None:
    """The body that makes a backend continue ``partial``, with the fields its kind needs besides
    (``extra``; None: its kind cannot continue this API)."""
    if extra is None:
        return None
    body = dict(payload)
    for budget in ("max_tokens", "max_completion_tokens", "n_predict"):
        given = body.get(budget)
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            body[budget] = max(1, given - partial.pieces)
    if route == "/completions":
        body["prompt"] = str(payload["prompt"]) + partial.text
    else:
        body["messages"] = [*payload["messages"], {"role": "assistant", "content": partial.text}]
        body.update(extra)
    return json.dumps(body).encode()


class Seam:
    """Rewrites a continuation stream so that the client's stream reads as one: the first stream's
    identity on every chunk, no second role chunk, the echoed prefill removed (llama-server sends the
    prefill back, whitespace normalised, as its first content), the usage of both parts added."""

    def __init__(self, partial: Partial, route: str) -> None:
        self.partial = partial
        self.route = route
        self._events = EventBuffer()
        self._echo = partial.text.strip() if route in ("/chat/completions", "/messages") else ""
        self._held = ""  # content held while it may still be the echo
        self._held_chunk: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for what the continuation sent (complete events only)."""
        out: list[bytes] = []
        for event in self._events.complete(chunk):
            out.extend(self._rewrite(event))
        return b"".join(out)

    def _rewrite(self, event: bytes) -> list[bytes]:
        payloads = events_in(event)
        if not payloads:
            return [event]  # a comment or a named event without data: as it came
        payload = payloads[0]
        if self.route == "/messages":
            return self._rewrite_message(event, payload)
        if payload.strip() == b"[DONE]":
            return [*self._release_held(), b"data: [DONE]\n\n"]
        try:
            chunk = json.loads(payload)
        except ValueError:
            return [event]
        if not isinstance(chunk, dict):
            return [event]
        chunk.update(self.partial.first)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage["completion_tokens"] += self.partial.pieces
            if isinstance(usage.get("total_tokens"), int):
                usage["total_tokens"] += self.partial.pieces
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else None
        if choice is not None and self.route == "/chat/completions":
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if (
                isinstance(delta, dict)
                and "role" in delta
                and not content
                and not choice.get("finish_reason")
            ):
                return []  # the client had its role chunk from the first stream
            if self._echo and isinstance(content, str):
                self._held += content
                self._held_chunk = chunk
                if len(self._held.strip()) < len(self._echo) and self._echo.startswith(self._held.strip()):
                    return []  # may still be the echo: wait for more
                return self._release_held()
            if self._echo and self._held_chunk is None and choice.get("finish_reason"):
                self._echo = ""
        return [*self._release_held(), _sse(chunk)]  # what was held goes first, in order

    def _rewrite_message(self, event: bytes, payload: bytes) -> list[bytes]:
        """Anthropic's events: the client keeps its one ``message_start`` and its open text block;
        the continuation's block indices follow the client's."""
        try:
            chunk = json.loads(payload)
        except ValueError:
            return [event]
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        partial = self.partial
        offset = partial.block if partial.block_open else partial.block + 1
        if kind == "message_start":
            return []
        if kind == "content_block_start":
            if partial.block_open and chunk.get("index") == 0:
                return []  # the client's text block is still open: it goes on
            chunk["index"] = int(chunk.get("index", 0)) + offset
            return [_named(chunk)]
        if kind in ("content_block_delta", "content_block_stop"):
            chunk["index"] = int(chunk.get("index", 0)) + offset
            delta = chunk.get("delta") or {}
            if kind == "content_block_delta" and self._echo and delta.get("type") == "text_delta":
                self._held += str(delta.get("text") or "")
                self._held_chunk = chunk
                if len(self._held.strip()) < len(self._echo) and self._echo.startswith(self._held.strip()):
                    return []
                return self._release_held_message()
            return [*self._release_held_message(), _named(chunk)]
        if kind == "message_delta":
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                usage["output_tokens"] += partial.pieces
        return [*self._release_held_message(), _named(chunk)]

    def _release_held_message(self) -> list[bytes]:
        chunk, held = self._held_chunk, self._held
        self._held, self._held_chunk = "", None
        if chunk is None:
            return []
        echo, self._echo = self._echo, ""
        stripped = held.lstrip()
        if stripped.startswith(echo):
            held = stripped[len(echo) :]
            if self.partial.text[-1:].isspace():
                held = held.lstrip()
        if not held:
            return []
        chunk["delta"] = {**chunk["delta"], "text": held}
        return [_named(chunk)]

    def _release_held(self) -> list[bytes]:
        """Send what was held, less the echoed prefill if that is what it was."""
        chunk, held = self._held_chunk, self._held
        self._held, self._held_chunk = "", None
        echo, self._echo = self._echo, ""
        if chunk is None:
            return []
        stripped = held.lstrip()
        if stripped.startswith(echo):
            held = stripped[len(echo) :]
            if self.partial.text[-1:].isspace():
                held = held.lstrip()  # the client's text already ends with the seam's space
        choice = chunk["choices"][0]
        choice["delta"] = {**choice["delta"], "content": held}
        if not held and not choice.get("finish_reason"):
            return []
        return [_sse(chunk)]


def _named(chunk: dict[str, Any]) -> bytes:
    """An Anthropic event: named by its type."""
    return f"event: {chunk.get('type')}\n".encode() + _sse(chunk)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
