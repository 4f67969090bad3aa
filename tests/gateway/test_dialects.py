"""Each API family's strategy: error shapes, stream error events, credentials, session keys."""

from __future__ import annotations

import json

import pytest

from local_inference_pool.errors import InvalidRequestError, QueueFullError, QueueTimeoutError
from local_inference_pool.gateway.dialects import ANTHROPIC, OPENAI, RESPONSES


def body_of(response: object) -> dict[str, object]:
    return dict(json.loads(response.body))  # type: ignore[attr-defined]


def test_anthropic_errors_have_anthropics_shape_and_types_by_status() -> None:
    shapes = {
        status: body_of(ANTHROPIC.error(status, "why", "x", "code"))
        for status in (400, 401, 403, 404, 413, 429, 500, 502)
    }
    assert shapes[404] == {"type": "error", "error": {"type": "not_found_error", "message": "why"}}
    assert {s: b["error"]["type"] for s, b in shapes.items()} == {  # type: ignore[index]
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        502: "api_error",
    }


def test_pool_overload_is_anthropics_529_and_a_full_queue_its_rate_limit() -> None:
    overloaded = ANTHROPIC.error_for(QueueTimeoutError("waited", model="m", waited=1.0))
    full = ANTHROPIC.error_for(QueueFullError("full"))
    assert overloaded.status_code == 529
    assert body_of(overloaded)["error"] == {"type": "overloaded_error", "message": "waited"}
    assert (full.status_code, full.headers["retry-after"]) == (429, "1")
    assert body_of(full)["error"] == {"type": "rate_limit_error", "message": "full"}
    assert (overloaded.code, full.code) == ("queue_timeout", "queue_full")  # for metrics


def test_openai_routes_keep_openais_shape() -> None:
    for dialect in (OPENAI, RESPONSES):
        answer = dialect.error(404, "why", "invalid_request_error", "model_not_found")
        assert body_of(answer) == {
            "error": {
                "message": "why",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }


def test_each_family_ends_a_failed_stream_with_its_own_error_event() -> None:
    anthropic = ANTHROPIC.stream_error("gone", "upstream_failed").decode()
    responses = RESPONSES.stream_error("gone", "upstream_failed").decode()
    chat = OPENAI.stream_error("gone", "upstream_failed").decode()
    assert anthropic.startswith("event: error\ndata: ")
    assert json.loads(anthropic.split("data: ")[1])["error"] == {"type": "api_error", "message": "gone"}
    assert responses.startswith("event: error\ndata: ")
    assert json.loads(responses.split("data: ")[1])["code"] == "upstream_failed"
    assert chat.startswith("data: ")
    assert json.loads(chat.removeprefix("data: "))["error"]["code"] == "upstream_failed"
    for event in (anthropic, responses, chat):
        assert event.endswith("\n\n")


def test_anthropic_clients_key_is_x_api_key_and_two_are_refused() -> None:
    assert ANTHROPIC.credentials([(b"x-api-key", b"sk-1")]) == "Bearer sk-1"
    assert ANTHROPIC.credentials([(b"authorization", b"Bearer sk-2")]) == "Bearer sk-2"
    assert OPENAI.credentials([(b"x-api-key", b"sk-1")]) == ""  # not on OpenAI routes
    with pytest.raises(InvalidRequestError) as twice:
        ANTHROPIC.credentials([(b"x-api-key", b"a"), (b"x-api-key", b"b")])
    assert twice.value.code == "duplicate_authorization"


def test_session_keys_by_family() -> None:
    header = {b"x-session-id": b"s-1"}
    assert ANTHROPIC.session_key(header, {}) == "header:s-1"
    assert ANTHROPIC.session_key({}, {"metadata": {"user_id": "u-7"}}) == "user:u-7"
    turn_1 = {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]}
    turn_2 = {**turn_1, "messages": [*turn_1["messages"], {"role": "assistant", "content": "yo"}]}
    assert ANTHROPIC.session_key({}, turn_1) == ANTHROPIC.session_key({}, turn_2)  # one conversation
    other_system = {**turn_1, "system": "be long"}
    assert ANTHROPIC.session_key({}, other_system) != ANTHROPIC.session_key({}, turn_1)
    assert RESPONSES.session_key({}, {"prompt_cache_key": "k"}) == "prompt_cache_key:k"
    first = {"instructions": "i", "input": [{"role": "user", "content": "a"}]}
    later = {
        "instructions": "i",
        "input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    }
    assert RESPONSES.session_key({}, first) == RESPONSES.session_key({}, later)
    assert RESPONSES.session_key({}, {"input": "hello"}) is not None
    assert RESPONSES.session_key({}, {}) is None


LONG_SYSTEM = "You follow the team's rules. " * 40


def test_each_family_reads_its_prompt_system_first_then_each_message() -> None:
    chat = {"messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "one"}]}
    messages = {"system": LONG_SYSTEM, "messages": [{"role": "user", "content": "one"}]}
    responses = {"instructions": LONG_SYSTEM, "input": [{"role": "user", "content": "one"}]}
    prompts = [
        OPENAI.prompt(chat, "m"),
        ANTHROPIC.prompt(messages, "m"),
        RESPONSES.prompt(responses, "m"),
        OPENAI.prompt({"prompt": LONG_SYSTEM + "one"}, "m"),
    ]
    for prompt in prompts:
        assert prompt is not None
        assert len(prompt.blocks) >= 4  # the long system prompt's blocks
    turn = {
        **chat,
        "messages": [
            *chat["messages"],
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "x"},
        ],
    }
    later = OPENAI.prompt(turn, "m")
    first = prompts[0]
    assert later is not None
    assert first is not None
    assert later.blocks[: len(first.blocks)] == first.blocks  # a conversation's turns share their start
    assert later.history_chars == later.chars - len("<user>x")


def test_what_has_no_prompt_has_none_and_hostile_bodies_render_without_error() -> None:
    assert OPENAI.prompt({"input": ["a", "b"]}, "m") is None  # embeddings
    assert ANTHROPIC.prompt({"messages": "not a list"}, "m") is None
    assert RESPONSES.prompt({"input": []}, "m") is None
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    prompt = OPENAI.prompt({"messages": [{"role": "user", "content": deep}]}, "m")
    assert prompt is not None  # too deep to render: counted as nothing, not an error
    huge = OPENAI.prompt({"messages": [{"role": "user", "content": "y" * (1 << 22)}]}, "m")
    assert huge is not None
    assert huge.chars <= 1 << 20  # rendering stops where the index would
