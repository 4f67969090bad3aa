"""The bodies made acceptable per backend kind (``upstream.request_filters``): what each filter
removes and moves, and what it leaves as it came. The e2e stage sends the same shapes to a real
llama-server (``test_codex_responses_request_is_made_acceptable_to_llama_server``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_inference_pool.upstream.request_filters import acceptable_body

USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
WAIT = {"type": "function", "name": "wait", "parameters": {"type": "object", "properties": {}}}
SPAWN = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {}}}
EXEC = {"type": "custom", "name": "exec", "description": "Run JavaScript"}
CODEX_TOOLS = {
    "type": "additional_tools",
    "role": "developer",
    "tools": [
        {"type": "namespace", "name": "functions", "tools": [EXEC, WAIT]},
        {"type": "namespace", "name": "collaboration", "tools": [SPAWN]},
    ],
}
ENCRYPTED = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}
READABLE = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "I thought"}]}


def adjusted(payload: Any, kind: str = "llamacpp", route: str = "/responses") -> Any:
    body = json.dumps(payload).encode()
    return json.loads(acceptable_body(kind, route, body))


def test_codex_tools_leave_the_input_for_the_top_level_tools_as_function_tools() -> None:
    given = {"model": "gpt-5", "input": [CODEX_TOOLS, USER], "tools": [WAIT], "stream": True}
    sent = adjusted(given)
    assert sent["input"] == [USER]
    assert sent["tools"] == [WAIT, SPAWN]  # namespaces opened, exec (custom) dropped, wait once
    assert sent["model"] == "gpt-5"
    assert sent["stream"] is True


def test_a_reasoning_item_without_text_is_removed_and_one_with_text_kept() -> None:
    sent = adjusted({"model": "m", "input": [USER, ENCRYPTED, READABLE, USER]})
    assert sent["input"] == [USER, READABLE, USER]
    assert "tools" not in sent


@pytest.mark.parametrize(
    ("kind", "route"), [("vllm", "/responses"), ("ollama", "/responses"), ("llamacpp", "/chat/completions")]
)
def test_other_kinds_and_routes_get_the_body_as_it_came(kind: str, route: str) -> None:
    body = json.dumps({"model": "m", "input": [CODEX_TOOLS, USER]}).encode()
    assert acceptable_body(kind, route, body) is body


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "input": "hi"}',  # nothing a filter is for: not even parsed
        b'{"model": "m", "input": [{"type": "message", "role": "user", "content": "reasoning"}]}',
        b'{"input": "additional_tools", ',  # not JSON
        b'["additional_tools"]',  # not an object
        b'{"input": {"type": "additional_tools"}}',  # input not a list
        b'{"input": [{"type": "reasoning", "content": [{"text": "x"}]}]}',  # readable: kept
    ],
)
def test_a_body_with_nothing_to_remove_or_not_shaped_so_is_sent_as_it_came(body: bytes) -> None:
    assert acceptable_body("llamacpp", "/responses", body) is body


def test_malformed_tool_lists_give_no_tools_and_deep_namespaces_stop() -> None:
    deep: dict[str, Any] = WAIT
    for _ in range(10):
        deep = {"type": "namespace", "name": "n", "tools": [deep]}
    weird = {"type": "additional_tools", "tools": [deep, "x", {"type": "function"}, {"type": "namespace"}]}
    sent = adjusted({"input": [weird, {"type": "additional_tools", "tools": "x"}, USER], "tools": "bad"})
    assert sent["input"] == [USER]
    assert sent["tools"] == "bad"  # nothing usable to add: the client's tools as they were


def test_a_tool_two_namespaces_down_is_found() -> None:
    nested = {
        "type": "namespace",
        "name": "a",
        "tools": [{"type": "namespace", "name": "b", "tools": [WAIT]}],
    }
    sent = adjusted({"input": [{"type": "additional_tools", "tools": [nested]}, USER]})
    assert sent["tools"] == [WAIT]
