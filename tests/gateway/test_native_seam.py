"""The native seam: llama-server's ``/completion`` stream, as the real server sends it (captured from
llama-server with Gemma 3), rewritten into the client's chat, completion or Anthropic stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_inference_pool.gateway.failover import read_partial
from local_inference_pool.gateway.native_seam import NativeSeam

# Captured from llama-server's native /completion, streamed (trimmed to the fields read, plus one
# that is not: generation_settings).
NATIVE = (
    b'data: {"index":0,"content":":","tokens":[236787],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":5}\n\n'
    b'data: {"index":0,"content":" ","tokens":[236743],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":2,"tokens_evaluated":5}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"gemma",'
    b'"tokens_predicted":2,"tokens_evaluated":5,"generation_settings":{"n_predict":2},'
    b'"prompt":"<bos><start_of_turn>user\\nCount","stop_type":"limit","stopping_word":"",'
    b'"timings":{"cache_n":4,"prompt_n":1,"prompt_ms":27.8,"predicted_n":2}}\n\n'
)
CHAT_SO_FAR = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"created":7,"id":"chatcmpl-first","model":"gemma","system_fingerprint":"b0","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"The"}}],'
    b'"created":7,"id":"chatcmpl-first","model":"gemma","system_fingerprint":"b0","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" epis"}}],'
    b'"created":7,"id":"chatcmpl-first","model":"gemma","system_fingerprint":"b0","object":"chat.completion.chunk"}\n\n'
)


def data(raw: bytes) -> list[Any]:
    found = []
    for event in raw.decode().split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


def rewrite(seam: NativeSeam, raw: bytes, *, bytewise: bool = False) -> bytes:
    if not bytewise:
        return seam.feed(raw)
    return b"".join(seam.feed(raw[i : i + 1]) for i in range(len(raw)))


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_chat_goes_on_with_the_first_streams_identity_and_usage_for_the_clients_request(
    bytewise: bool,
) -> None:
    partial = read_partial(CHAT_SO_FAR, "/chat/completions")
    payload = {"stream_options": {"include_usage": True}}
    seam = NativeSeam(partial, "/chat/completions", payload, prompt_tokens=22)
    events = data(rewrite(seam, NATIVE, bytewise=bytewise))
    chunks = [e for e in events if isinstance(e, dict)]
    assert [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]] == [":", " ", None]
    assert all(c["id"] == "chatcmpl-first" and c["created"] == 7 for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == "b0" for c in chunks)
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == []
    assert chunks[3]["usage"] == {
        "completion_tokens": 4,  # two pieces on the first server, two on this one
        "prompt_tokens": 22,  # the client's prompt, not the prompt plus the pieces
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert chunks[3]["timings"]["prompt_n"] == 1
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    assert not any("generation_settings" in c or "prompt" in c for c in chunks)


def test_without_usage_asked_the_timings_ride_on_the_finish_chunk() -> None:
    partial = read_partial(CHAT_SO_FAR, "/chat/completions")
    events = data(NativeSeam(partial, "/chat/completions", {}, prompt_tokens=22).feed(NATIVE))
    chunks = [e for e in events if isinstance(e, dict)]
    assert not any("usage" in c for c in chunks)
    assert chunks[-1]["timings"]["cache_n"] == 4


def test_a_completion_goes_on_as_text_completion_chunks() -> None:
    so_far = b'data: {"choices":[{"text":"1,","index":0,"finish_reason":null}],"id":"cmpl-1","created":3,"model":"gemma","object":"text_completion"}\n\n'
    partial = read_partial(so_far, "/completions")
    events = data(NativeSeam(partial, "/completions", {}, prompt_tokens=9).feed(NATIVE))
    chunks = [e for e in events if isinstance(e, dict)]
    assert [c["choices"][0]["text"] for c in chunks] == [":", " ", ""]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-1" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]"


def named(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for event in raw.decode().split("\n\n"):
        lines = event.split("\n")
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        if datas:
            found.append((names[0] if names else "", datas[0]))
    return found


MESSAGE_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","content":[],"model":"gemma","stop_reason":null,"usage":{"output_tokens":0}}}\n\n'
)
BLOCK_OPEN = b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"The"}}\n\n'


def test_an_anthropic_stream_goes_on_in_its_open_text_block() -> None:
    partial = read_partial(MESSAGE_START + BLOCK_OPEN + DELTA, "/messages")
    events = named(NativeSeam(partial, "/messages", {}, prompt_tokens=9).feed(NATIVE))
    assert [name for name, _ in events] == [
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(e["index"] == 0 for _, e in events[:3])
    assert events[3][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[3][1]["usage"] == {"output_tokens": 3}


def test_an_anthropic_stream_cut_before_its_text_block_opens_one() -> None:
    partial = read_partial(MESSAGE_START, "/messages")
    events = named(NativeSeam(partial, "/messages", {}, prompt_tokens=9).feed(NATIVE))
    assert events[0] == (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    assert [name for name, _ in events].count("content_block_stop") == 1


@pytest.mark.parametrize(
    ("stop_type", "finish", "stop_reason"),
    [("eos", "stop", "end_turn"), ("word", "stop", "stop_sequence"), ("limit", "length", "max_tokens")],
)
def test_the_servers_stop_type_is_the_finish_reason(stop_type: str, finish: str, stop_reason: str) -> None:
    final = (
        b'data: {"content":"","stop":true,"stop_type":"'
        + stop_type.encode()
        + b'","stopping_word":'
        + (b'" 1"' if stop_type == "word" else b'""')
        + b',"tokens_predicted":1}\n\n'
    )
    chat = data(
        NativeSeam(
            read_partial(CHAT_SO_FAR, "/chat/completions"), "/chat/completions", {}, prompt_tokens=1
        ).feed(final)
    )
    assert chat[0]["choices"][0]["finish_reason"] == finish
    message = named(
        NativeSeam(
            read_partial(MESSAGE_START + BLOCK_OPEN, "/messages"), "/messages", {}, prompt_tokens=1
        ).feed(final)
    )
    delta = message[-2][1]["delta"]
    assert delta["stop_reason"] == stop_reason
    assert delta["stop_sequence"] == (" 1" if stop_type == "word" else None)


def test_a_server_error_mid_continuation_reaches_the_client_in_its_dialect_and_ends_it() -> None:
    error = b'data: {"error":{"code":500,"message":"context full","type":"server_error"}}\n\n'
    seam = NativeSeam(
        read_partial(CHAT_SO_FAR, "/chat/completions"), "/chat/completions", {}, prompt_tokens=1
    )
    assert data(seam.feed(error)) == [
        {"error": {"code": 500, "message": "context full", "type": "server_error"}}
    ]
    assert seam.feed(NATIVE) == b""  # nothing after the end
    message = NativeSeam(read_partial(MESSAGE_START, "/messages"), "/messages", {}, prompt_tokens=1)
    assert named(message.feed(error)) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "context full"}})
    ]
