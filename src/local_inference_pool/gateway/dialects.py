"""The API families the pool speaks, each a small strategy: how the pool's own errors look, how a
failure after a stream started is told, where a client's key and a session's key are found, and
how a request's prompt reads for the backends' prompt caches (``prompt``: its parts in the order a
chat template puts them: tools and system first, then each message; the last part the newest).

- ``OPENAI``: chat/completions, completions, embeddings and the other OpenAI-shaped routes;
- ``RESPONSES``: OpenAI's Responses API (OpenAI's error body; its own stream error event and
  session hints);
- ``ANTHROPIC``: Anthropic's Messages API (``{"type": "error", "error": {...}}``, ``x-api-key``,
  ``event: error`` in a stream).

The relay itself has no branches on the family: it asks the route's dialect.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from local_inference_pool.core.prompt_index import BLOCK_CHARS, MAX_BLOCKS, Prompt, prompt_of
from local_inference_pool.errors import PoolError
from local_inference_pool.gateway.inbound import authorization, single_header
from local_inference_pool.gateway.replies import ErrorReply, openai_error

__all__ = ["ANTHROPIC", "DIALECTS", "OPENAI", "RESPONSES", "Dialect"]

_RENDERED_CHARS: Final = BLOCK_CHARS * MAX_BLOCKS  # rendering stops where the index would

# Anthropic's error types by status (its API reference); 503 from the pool is its "overloaded".
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    529: "overloaded_error",
}


class Dialect:
    """OpenAI's: the default family, and the base of the others."""

    name = "openai"

    def error(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str | None,
        *,
        retry_after: float | None = None,
    ) -> ErrorReply:
        """The pool's own error answer in this family's shape."""
        return openai_error(status, message, error_type, code, retry_after=retry_after)

    def error_for(self, error: PoolError) -> ErrorReply:
        return self.error(
            error.status, error.message, error.error_type, error.code, retry_after=error.retry_after
        )

    def stream_error(self, message: str, code: str) -> bytes:
        """The last event of a stream whose backend failed after the answer started."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def credentials(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The client's ``Authorization`` value ('' when none); two of them are refused."""
        return authorization(headers)

    def session_key(self, headers: Mapping[bytes, bytes], payload: Mapping[str, Any]) -> str | None:
        """x-session-id, else the request's ``user``, else a hash of the conversation's start."""
        given = _header_session(headers)
        if given is not None:
            return given
        user = payload.get("user")
        if isinstance(user, str) and user:
            return f"user:{user}"
        messages = payload.get("messages")
        if isinstance(messages, list) and messages:
            return _prefix_key(_until_first_user(messages))
        prompt = payload.get("prompt")
        if isinstance(prompt, str) and prompt:
            return "prefix:" + hashlib.sha256(prompt[:1024].encode()).hexdigest()[:32]
        return None

    def prompt(self, payload: Mapping[str, Any], model: str) -> Prompt | None:
        """Chat's tools and messages, or a completion's ``prompt`` (text, or token ids); None for
        what has neither (embeddings of many inputs, and the like)."""
        messages = payload.get("messages")
        if isinstance(messages, list) and messages:
            return _rendered([payload.get("tools")], messages, model)
        prompt = payload.get("prompt")
        if isinstance(prompt, str) and prompt:
            return prompt_of([prompt[:_RENDERED_CHARS]], model=model)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:1]):
            return _rendered([], [prompt], model)
        return None


class ResponsesDialect(Dialect):
    """OpenAI's Responses API: OpenAI's error body; a stream fails with its ``error`` event."""

    name = "responses"

    def stream_error(self, message: str, code: str) -> bytes:
        body = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"

    def session_key(self, headers: Mapping[bytes, bytes], payload: Mapping[str, Any]) -> str | None:
        """x-session-id, ``prompt_cache_key`` (the client's own cache hint), ``user``, else a hash of
        the instructions and the first input (``previous_response_id`` pins, apart from this)."""
        given = _header_session(headers)
        if given is not None:
            return given
        for field in ("prompt_cache_key", "user", "safety_identifier"):
            value = payload.get(field)
            if isinstance(value, str) and value:
                return f"{field}:{value}"
        given_input = payload.get("input")
        first = given_input[:1] if isinstance(given_input, list) else given_input
        if not first:
            return None
        return _prefix_key([payload.get("instructions"), first])

    def prompt(self, payload: Mapping[str, Any], model: str) -> Prompt | None:
        """The instructions and tools, then each input item (or the input text)."""
        given_input = payload.get("input")
        items = given_input if isinstance(given_input, list) else [given_input] if given_input else []
        if not items:
            return None
        return _rendered([payload.get("tools"), payload.get("instructions")], items, model)


class AnthropicDialect(Dialect):
    """Anthropic's Messages API."""

    name = "anthropic"

    def error(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str | None,
        *,
        retry_after: float | None = None,
    ) -> ErrorReply:
        if status == 503:
            status = 529  # the pool is overloaded or starting: Anthropic's clients retry a 529
        anthropic_type = _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        body = {"type": "error", "error": {"type": anthropic_type, "message": message}}
        return ErrorReply(body, status=status, code=code, retry_after=retry_after)

    def stream_error(self, message: str, code: str) -> bytes:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"

    def credentials(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """``x-api-key`` (what Anthropic's clients send), else ``Authorization``."""
        headers = list(headers)
        key = single_header(headers, b"x-api-key", "x-api-key")
        return f"Bearer {key}" if key else super().credentials(headers)

    def session_key(self, headers: Mapping[bytes, bytes], payload: Mapping[str, Any]) -> str | None:
        """x-session-id, ``metadata.user_id``, else a hash of the system prompt and the messages up
        to the first user turn."""
        given = _header_session(headers)
        if given is not None:
            return given
        metadata = payload.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        if isinstance(user, str) and user:
            return f"user:{user}"
        messages = payload.get("messages")
        if isinstance(messages, list) and messages:
            return _prefix_key([payload.get("system"), *_until_first_user(messages)])
        return None

    def prompt(self, payload: Mapping[str, Any], model: str) -> Prompt | None:
        """The tools and system prompt, then each message."""
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        return _rendered([payload.get("tools"), payload.get("system")], messages, model)


OPENAI: Final = Dialect()
RESPONSES: Final = ResponsesDialect()
ANTHROPIC: Final = AnthropicDialect()
DIALECTS: Final = {dialect.name: dialect for dialect in (OPENAI, RESPONSES, ANTHROPIC)}


def _header_session(headers: Mapping[bytes, bytes]) -> str | None:
    header = headers.get(b"x-session-id")
    return "header:" + header.decode("latin-1") if header else None


def _until_first_user(messages: list[Any]) -> list[Any]:
    prefix: list[Any] = []
    for message in messages:
        prefix.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    return prefix


def _prefix_key(parts: list[Any]) -> str:
    return "prefix:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _rendered(head: list[Any], items: list[Any], model: str) -> Prompt:
    """The prompt of a request: what comes first (tools, system) as one part, then each item; a
    text part as it is, anything else as compact JSON. Rendering stops at what the index reads."""
    parts = ["".join(_text(part) for part in head if part)[:_RENDERED_CHARS]]
    total = len(parts[0])
    for item in items:
        if total >= _RENDERED_CHARS:
            break
        text = _text(item)[: _RENDERED_CHARS - total]
        parts.append(text)
        total += len(text)
    return prompt_of(parts, model=model)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # the common message
        return f"<{value.get('role')}>{value['content']}"
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""
