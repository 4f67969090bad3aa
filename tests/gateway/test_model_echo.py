"""``ModelEcho``: the served model's name replaced by the asked one in the answer's bytes, however
the answer is cut into chunks, and nothing else changed."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from local_inference_pool.gateway.model_echo import ModelEcho

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","model":"qwen2.5-7b","choices":[{"delta":{"content":"hi"}}]}\n\n'
ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model": "qwen2.5-7b","content":[]}}\n\n'
)
TEXT = json.dumps(
    {"model": "qwen2.5-7b", "content": 'he wrote "model":"qwen2.5-7b" here'}, separators=(",", ":")
).encode()


def echoed(data: bytes, cuts: list[int]) -> bytes:
    echo = ModelEcho("qwen2.5-7b", "claude-sonnet-4")
    pieces, start = [], 0
    for cut in sorted(cuts):
        pieces.append(echo.feed(data[start:cut]))
        start = cut
    pieces.append(echo.feed(data[start:]))
    return b"".join(pieces) + echo.flush()


def test_the_model_field_is_replaced_with_or_without_a_space() -> None:
    assert echoed(CHUNK * 2, []) == (CHUNK * 2).replace(b'"qwen2.5-7b"', b'"claude-sonnet-4"')
    assert b'"model": "claude-sonnet-4"' in echoed(ANTHROPIC, [])


def test_a_name_inside_the_answers_text_is_left_alone() -> None:
    out = json.loads(echoed(TEXT, []))
    assert out["model"] == "claude-sonnet-4"
    assert out["content"] == 'he wrote "model":"qwen2.5-7b" here'


def test_an_event_that_ends_a_chunk_is_not_held_back() -> None:
    echo = ModelEcho("qwen2.5-7b", "claude-sonnet-4")
    assert echo.feed(CHUNK).endswith(b"\n\n")
    assert echo.flush() == b""


@given(st.lists(st.integers(min_value=0, max_value=len(CHUNK * 3 + ANTHROPIC)), max_size=12))
def test_any_cutting_of_a_stream_gives_the_same_bytes(cuts: list[int]) -> None:
    stream = CHUNK * 3 + ANTHROPIC
    assert echoed(stream, cuts) == echoed(stream, [])
