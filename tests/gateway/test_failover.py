"""Continuing a broken stream (``failover.py``): what may be continued, the request, the seam."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_inference_pool.gateway.failover import (
    API,
    MAX_RECORDED,
    Partial,
    Recorder,
    Seam,
    continuation,
    read_partial,
    refusal,
)

CHAT = {"model": "m", "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c).encode()) + b"\n\n" for c in chunks
    )


def delta(**fields: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": fields, "finish_reason": None}],
    }


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, None),
        ({"stream": False}, "not streamed"),
        ({"response_format": {"type": "json_object"}}, "constrained output"),
        ({"grammar": "root ::= x"}, "constrained output"),
        ({"n": 2}, "n > 1"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": "hi"}, "messages shape"),
    ],
)
def test_what_may_be_continued(change: dict[str, Any], why: str | None) -> None:
    assert refusal({**CHAT, **change}, "/chat/completions") == why


def test_completions_with_echo_or_a_list_prompt_are_not_continued() -> None:
    base = {"stream": True, "prompt": "x"}
    assert refusal(base, "/completions") is None
    assert refusal({**base, "echo": True}, "/completions") == "prompt shape"
    assert refusal({**base, "prompt": ["x", "y"]}, "/completions") == "prompt shape"
    assert refusal(base, "/responses") == "route"
    assert refusal(base, "/messages") == "messages shape"


def test_the_partial_answer_is_read_back_from_any_line_endings() -> None:
    data = sse(delta(role="assistant", content=None), delta(content="Hel"), delta(content="lo"))
    partial = read_partial(data.replace(b"\n", b"\r\n") + b'data: {"cut', "/chat/completions")
    assert (partial.text, partial.pieces, partial.finished, partial.refusal) == ("Hello", 2, False, None)
    assert partial.first == {"id": "chatcmpl-1", "created": 7, "model": "m"}


def test_a_tool_call_or_an_open_reasoning_block_is_not_continued() -> None:
    tool = read_partial(
        sse(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"a'}}])), "/chat/completions"
    )
    assert tool.refusal == "tool call in progress"
    thinking = read_partial(sse(delta(reasoning_content="hmm")), "/chat/completions")
    assert thinking.refusal == "reasoning open"
    answered = read_partial(sse(delta(reasoning_content="hmm"), delta(content="Yes")), "/chat/completions")
    assert answered.refusal is None  # the reasoning closed before the answer broke


def test_a_stream_that_ended_has_nothing_to_continue() -> None:
    assert read_partial(sse(delta(content="a"), "[DONE]"), "/chat/completions").finished


def test_the_continuation_request_per_backend_kind() -> None:
    from local_inference_pool.upstream.backends import continues

    partial = Partial(text="1, 2, 3,", pieces=4)

    def body(kind: str, route: str = "/chat/completions", payload: dict[str, Any] = CHAT) -> Any:
        made = continuation(payload, partial, route, continues(kind, API[route]))
        return None if made is None else json.loads(made)

    llama = body("llamacpp")
    assert llama["messages"][-1] == {"role": "assistant", "content": "1, 2, 3,"}
    assert llama["max_tokens"] == 6
    vllm = body("vllm")
    assert (vllm["continue_final_message"], vllm["add_generation_prompt"]) == (True, False)
    assert body("lmstudio") is None
    assert body("openai") is None
    assert body("auto") is None  # not probed yet: not asked
    completion = body("ollama", "/completions", {"prompt": "Count:", "max_tokens": 3})
    assert completion == {"prompt": "Count:1, 2, 3,", "max_tokens": 1}
    messages = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert body("llamacpp", "/messages", messages)["messages"][-1]["role"] == "assistant"
    assert body("ollama", "/messages", messages) is None  # its Anthropic continuation is unconfirmed


def events(data: bytes) -> list[Any]:
    return [
        json.loads(line[6:]) if line[6:] != b"[DONE]" else "[DONE]"
        for line in data.split(b"\n")
        if line.startswith(b"data: ")
    ]


def test_the_seam_removes_the_echo_and_keeps_the_first_streams_identity() -> None:
    partial = Partial(text="tok0 tok1 ", pieces=2, first={"id": "chatcmpl-1", "created": 7, "model": "m"})
    seam = Seam(partial, "/chat/completions")
    second: list[dict[str, Any] | str] = [
        {
            "id": "other",
            "created": 9,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
        },
        {
            "id": "other",
            "created": 9,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "tok0 tok1 "}, "finish_reason": None}],
        },
        {
            "id": "other",
            "created": 9,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "tok2 "}, "finish_reason": None}],
        },
        {
            "id": "other",
            "created": 9,
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        },
        {
            "id": "other",
            "created": 9,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
        },
        "[DONE]",
    ]
    raw = sse(*second)
    out = events(b"".join(seam.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)))  # any chunking
    chunks = [e for e in out if isinstance(e, dict)]
    assert [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]] == ["tok2 ", None]
    assert {(c["id"], c["created"]) for c in chunks} == {("chatcmpl-1", 7)}
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert out[-1] == "[DONE]"


def test_a_backend_that_does_not_echo_loses_nothing_at_the_seam() -> None:
    partial = Partial(text="tok0 tok1 ", pieces=2, first={"id": "chatcmpl-1"})
    seam = Seam(partial, "/chat/completions")
    out = events(seam.feed(sse(delta(content="tok2 "), delta(content="tok3 "))))
    assert [c["choices"][0]["delta"]["content"] for c in out] == ["tok2 ", "tok3 "]


def test_a_recorder_gives_up_past_its_bound() -> None:
    recorder = Recorder()
    recorder.feed(b"x" * 10)
    assert bytes(recorder.buffer) == b"x" * 10
    recorder.feed(b"y" * MAX_RECORDED)
    assert recorder.overflow
    assert not recorder.buffer


def test_content_held_as_a_possible_echo_goes_out_before_the_end() -> None:
    partial = Partial(text="the the cat ", pieces=3, first={"id": "chatcmpl-1"})
    seam = Seam(partial, "/chat/completions")
    finish = {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out = events(seam.feed(sse(delta(content="the"), finish, "[DONE]")))  # no echo: "the" is new text
    assert [c["choices"][0]["delta"].get("content") for c in out if isinstance(c, dict)] == ["the", None]
    assert out[-1] == "[DONE]"
