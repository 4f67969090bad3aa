"""Continuing an answer on llama-server by token ids: the requests, and how to read their answers.

A stream cut midway is continued exactly where it stopped when the second server is given the very
tokens the first one had: the conversation rendered by the server's own chat template and tokenized
as its chat route tokenizes it, then each generated piece tokenized on its own (llama-server streams
one token per piece), all sent as token ids to its native ``/completion`` route. Text prefill cannot
promise that: the partial text is tokenized again as a whole (a word cut in two becomes other
tokens), and a template without prefill support closes the assistant's turn, so the model starts its
answer again (llama.cpp's built-in ``gemma`` template does, measured).

Three requests take no slot: ``POST /apply-template`` (the chat body, answered with
``{"prompt": ...}``) and ``POST /tokenize`` twice (the prompt with its BOS; the pieces as a list,
which llama-server tokenizes one by one). Then the streamed ``POST /completion`` continues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = [
    "COMPLETION_PATH",
    "TEMPLATE_PATH",
    "TOKENIZE_PATH",
    "completion_body",
    "read_prompt",
    "read_tokens",
    "template_body",
    "tokenize_body",
]

TEMPLATE_PATH: Final = "/apply-template"
TOKENIZE_PATH: Final = "/tokenize"
COMPLETION_PATH: Final = "/completion"

# Fields of a chat or Messages request that are not sampling settings: they shape the prompt (which
# is rendered already) or the answer's format, and the native route has no use for them.
_NOT_SAMPLING: Final = frozenset(
    {
        "messages",
        "system",
        "prompt",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "reasoning_format",
        "reasoning_effort",
        "thinking",
        "metadata",
        "service_tier",
        "stream_options",
        "stop_sequences",
        "max_tokens",
        "max_completion_tokens",
        "n_predict",
        "n",
        "user",
        "store",
    }
)


def template_body(payload: Mapping[str, Any], api: str) -> dict[str, Any] | None:
    """The body that makes ``/apply-template`` render the request's conversation as the chat route
    would, or None when it cannot be said in OpenAI's chat terms (Anthropic blocks other than text)."""
    if api == "chat":
        if not all(_text_only(m) for m in payload.get("messages") or []):
            return None  # images or audio: their tokens are not the text of their markers
        return {key: value for key, value in payload.items() if key != "stream"}
    if api != "messages":
        return None
    messages: list[dict[str, Any]] = []
    system = payload.get("system")
    if system:
        content = _content_of(system)
        if content is None:
            return None
        messages.append({"role": "system", "content": content})
    for message in payload.get("messages") or []:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return None
        content = _content_of(message.get("content"))
        if content is None:
            return None
        messages.append({"role": message["role"], "content": content})
    body: dict[str, Any] = {"messages": messages}
    if "model" in payload:
        body["model"] = payload["model"]  # a router sends it to that model's server
    return body


def _text_only(message: Any) -> bool:
    """Whether an OpenAI chat message holds text only (a string, or text parts)."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    )


def _content_of(content: Any) -> str | list[dict[str, str]] | None:
    """An Anthropic content in OpenAI's terms, as llama-server converts it: a string stays one, text
    blocks become text parts; None for anything else (images, tool use and results, documents)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts: list[dict[str, str]] = []
    for block in content:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            return None
        parts.append({"type": "text", "text": block["text"]})
    return parts


def tokenize_body(content: str | Sequence[str], *, model: Any = None, with_bos: bool) -> dict[str, Any]:
    """``/tokenize``'s body: a string, or a list of strings that are tokenized one by one (no token
    crosses from one to the next). Special-token text is parsed, as the chat route parses it."""
    body: dict[str, Any] = {"content": content if isinstance(content, str) else list(content)}
    body["add_special"] = with_bos
    body["parse_special"] = True
    if model is not None:
        body["model"] = model
    return body


def completion_body(
    payload: Mapping[str, Any], tokens: Sequence[int], max_tokens: int | None
) -> dict[str, Any]:
    """The streamed ``/completion`` request that goes on from ``tokens``, with the client's sampling
    settings (Anthropic's ``stop_sequences`` as ``stop``) and ``max_tokens`` left to generate."""
    body = {key: value for key, value in payload.items() if key not in _NOT_SAMPLING}
    stops = payload.get("stop_sequences")
    if isinstance(stops, list) and "stop" not in body:
        body["stop"] = stops
    body["prompt"] = list(tokens)
    body["stream"] = True
    body["cache_prompt"] = True
    if max_tokens is not None:
        body["n_predict"] = max_tokens
    return body


def read_prompt(answer: Any) -> str | None:
    """The rendered prompt from ``/apply-template``'s answer."""
    prompt = answer.get("prompt") if isinstance(answer, dict) else None
    return prompt if isinstance(prompt, str) else None


def read_tokens(answer: Any) -> list[int] | None:
    """The token ids from ``/tokenize``'s answer (plain ids; with pieces, each ``{"id": ...}``)."""
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        return None
    ids: list[int] = []
    for token in tokens:
        if isinstance(token, dict):
            token = token.get("id")
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            return None
        ids.append(token)
    return ids
