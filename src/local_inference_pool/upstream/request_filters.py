"""Requests made acceptable to a kind of server that refuses what it does not know.

A client written for OpenAI's or Anthropic's API sends what those APIs take, and some servers
answer 400 to a field or an input item they do not read. Where a request would be refused that
way, and what it asks for can still be served, the pool adjusts the body for that backend's kind
before it leaves. Each filter is documented here and in the README, and tested against the real
server where one runs here (the e2e stage).

llama.cpp (``llamacpp``), ``/responses``: llama-server turns a Responses request into a chat
completion, and answers 400 to an input item it has no rule for.

- An ``additional_tools`` item (Codex CLI 0.144 and later sends its tools this way, with
  ``role: developer``, not in the top-level ``tools``) got "Cannot determine type of 'item'". The
  item is removed and its tools join the top-level ``tools``: a ``namespace`` entry gives its own
  tools, and only ``function`` tools are kept, the one kind of tool llama.cpp's conversion takes
  (a ``custom`` freeform tool, such as Codex's ``exec``, has no JSON schema to give it). A tool
  whose name is already among the top-level tools is not added twice.
- A ``reasoning`` item without readable text (``content`` missing or empty, as Codex sends an
  earlier turn's reasoning: encrypted, for OpenAI's servers only) got "item['content'] is not an
  array" or "is empty". The item is removed; one with text is kept, and llama.cpp reads it.

A body that is not JSON, or not shaped as the filter expects, is sent as it came: the server's
own answer says what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["FILTERED_ROUTES", "acceptable_body"]

MAX_NAMESPACE_DEPTH = 4  # namespaces within namespaces, followed this deep


def acceptable_body(kind: str, route: str, body: bytes) -> bytes:
    """``body`` as a backend of ``kind`` accepts it on ``route``: the same bytes when it needs no
    change (every request but the few a filter is for, checked without parsing)."""
    known = _FILTERS.get((kind, route))
    if known is None:
        return body
    markers, adjust = known
    if not any(marker in body for marker in markers):
        return body
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body
    adjusted = adjust(payload) if isinstance(payload, dict) else None
    return body if adjusted is None else json.dumps(adjusted, ensure_ascii=False).encode()


def _llamacpp_responses(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The Responses request without the input items llama-server refuses; None if it has none."""
    items = payload.get("input")
    if not isinstance(items, list):
        return None
    kept: list[Any] = []
    tools: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            tools += _function_tools(item.get("tools"), MAX_NAMESPACE_DEPTH)
        elif isinstance(item, dict) and item.get("type") == "reasoning" and not _readable(item):
            continue
        else:
            kept.append(item)
    if len(kept) == len(items):
        return None
    adjusted = {**payload, "input": kept}
    if tools:
        given = payload.get("tools")
        given = given if isinstance(given, list) else []
        names = {tool.get("name") for tool in given if isinstance(tool, dict)}
        added = []
        for tool in tools:
            if tool["name"] not in names:
                names.add(tool["name"])
                added.append(tool)
        adjusted["tools"] = [*given, *added]
    return adjusted


def _function_tools(tools: Any, depth: int) -> list[dict[str, Any]]:
    """The function tools of a list of tools, namespaces opened."""
    found: list[dict[str, Any]] = []
    if not isinstance(tools, list):
        return found
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "namespace" and depth > 0:
            found += _function_tools(tool.get("tools"), depth - 1)
        elif tool.get("type") == "function" and isinstance(tool.get("name"), str):
            found.append(tool)
    return found


def _readable(item: dict[str, Any]) -> bool:
    """Whether llama-server can read a reasoning item: text in its first content part."""
    content = item.get("content")
    return (
        isinstance(content, list)
        and bool(content)
        and isinstance(content[0], dict)
        and isinstance(content[0].get("text"), str)
    )


# (kind, route) -> (byte strings of which one is in every body the filter changes, the filter)
_FILTERS: dict[
    tuple[str, str], tuple[tuple[bytes, ...], Callable[[dict[str, Any]], dict[str, Any] | None]]
] = {
    ("llamacpp", "/responses"): ((b'"additional_tools"', b'"reasoning"'), _llamacpp_responses),
}
FILTERED_ROUTES = frozenset(route for _, route in _FILTERS)  # the only routes a body may change on
