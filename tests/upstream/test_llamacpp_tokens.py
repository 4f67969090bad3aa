"""The requests that continue an answer on llama-server by token ids."""

from __future__ import annotations

from typing import Any

import pytest

from local_inference_pool.upstream.backends import continues_by_tokens
from local_inference_pool.upstream.backends import llamacpp_tokens as tokens


def test_only_llama_server_continues_by_token_ids() -> None:
    assert continues_by_tokens("llamacpp")
    assert not any(continues_by_tokens(k) for k in ("ollama", "lmstudio", "vllm", "openai", ""))


def test_a_chat_is_rendered_from_its_own_body() -> None:
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "tools": []}
    assert tokens.template_body(payload, "chat") == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [],  # a template may render tools into the prompt, as the chat route does
    }


def test_a_chat_with_an_image_is_not_rendered_its_markers_are_not_its_tokens() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    assert tokens.template_body(payload, "chat") is None


def test_anthropic_messages_are_said_in_openai_terms_as_llama_server_converts_them() -> None:
    payload = {
        "model": "m",
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "count"},
        ],
        "max_tokens": 9,
    }
    assert tokens.template_body(payload, "messages") == {
        "model": "m",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "count"},
        ],
    }


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "tool_result", "tool_use_id": "t", "content": "42"}],
        [{"type": "image", "source": {"type": "base64", "data": "AAAA"}}],
        [{"type": "text"}],
        {"type": "text", "text": "not a list"},
    ],
)
def test_anthropic_content_other_than_text_is_not_rendered(content: Any) -> None:
    assert tokens.template_body({"messages": [{"role": "user", "content": content}]}, "messages") is None


def test_the_pieces_are_tokenized_one_by_one_without_a_bos() -> None:
    assert tokens.tokenize_body(["The", " epis"], with_bos=False) == {
        "content": ["The", " epis"],
        "add_special": False,
        "parse_special": True,
    }
    assert tokens.tokenize_body("prompt", model="m", with_bos=True)["model"] == "m"


def test_the_native_request_keeps_the_sampling_and_drops_what_shaped_the_prompt() -> None:
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "top_k": 1,
        "seed": 7,
        "stop": ["\n\n"],
        "max_tokens": 90,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [],
    }
    body = tokens.completion_body(payload, [2, 105, 7], 75)
    assert body == {
        "model": "m",
        "temperature": 0,
        "top_k": 1,
        "seed": 7,
        "stop": ["\n\n"],
        "prompt": [2, 105, 7],
        "stream": True,
        "cache_prompt": True,
        "n_predict": 75,
    }
    anthropic = tokens.completion_body({"stop_sequences": ["END"], "system": "s"}, [1], None)
    assert anthropic == {"stop": ["END"], "prompt": [1], "stream": True, "cache_prompt": True}


@pytest.mark.parametrize(
    ("answer", "ids"),
    [
        ({"tokens": [2, 105]}, [2, 105]),
        ({"tokens": [{"id": 2, "piece": "<bos>"}]}, [2]),
        ({"tokens": [2, "x"]}, None),
        ({"tokens": [2, -1]}, None),
        ({"tokens": [True]}, None),
        ({"tokens": "2"}, None),
        ([2], None),
    ],
)
def test_token_answers_are_read_strictly(answer: Any, ids: list[int] | None) -> None:
    assert tokens.read_tokens(answer) == ids


def test_the_rendered_prompt_is_read_strictly() -> None:
    assert tokens.read_prompt({"prompt": "<start_of_turn>user\nhi"}) == "<start_of_turn>user\nhi"
    assert tokens.read_prompt({"prompt": 3}) is None
    assert tokens.read_prompt(None) is None
