"""The replay seam: the client's own request answered again from its start, joined to the client's
stream after the text it got, which is checked and not sent again."""

from __future__ import annotations

import json
from typing import Any

import pytest

from local_inference_pool.gateway.failover import SeamDiverged, read_partial
from local_inference_pool.gateway.replay_seam import ReplaySeam


def chat_chunk(
    content: str | None = None, *, role: bool = False, finish: str | None = None, ident: str = "first"
) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": None} if role else {}
    if content is not None:
        delta["content"] = content
    chunk = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 7 if ident == "first" else 9,
        "id": f"chatcmpl-{ident}",
        "model": "gemma",
        "object": "chat.completion.chunk",
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


SO_FAR = chat_chunk(role=True) + chat_chunk("The") + chat_chunk(" epis")


def replay(*pieces: str, finish: bool = True) -> bytes:
    out = chat_chunk(role=True, ident="again") + b"".join(chat_chunk(p, ident="again") for p in pieces)
    if finish:
        out += chat_chunk(finish="length", ident="again")
        usage = {"choices": [], "id": "chatcmpl-again", "usage": {"completion_tokens": len(pieces)}}
        out += b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"
    return out


def data(raw: bytes) -> list[Any]:
    found: list[Any] = []
    for event in raw.decode().split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


@pytest.mark.parametrize("step", [1, 5, 1 << 20])
def test_a_replayed_chat_sends_only_what_follows_the_cut_with_the_first_identity(step: int) -> None:
    seam = ReplaySeam(read_partial(SO_FAR, "/chat/completions"), "/chat/completions")
    raw = replay("The", " epis", "ode", " one")
    events = data(b"".join(seam.feed(raw[i : i + step]) for i in range(0, len(raw), step)))
    chunks = [e for e in events if isinstance(e, dict)]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert contents == ["ode", " one", None]  # no second role chunk
    assert all(c["id"] == "chatcmpl-first" for c in chunks)
    assert chunks[-1]["usage"] == {"completion_tokens": 4}  # the replay counted every token itself
    assert events[-1] == "[DONE]"


def test_a_piece_that_crosses_the_cut_sends_its_new_part() -> None:
    seam = ReplaySeam(read_partial(SO_FAR, "/chat/completions"), "/chat/completions")
    events = data(seam.feed(replay("The", " episode")))  # the server held " epis" back, then sent more
    assert (
        next(c["choices"][0]["delta"].get("content") for c in events if isinstance(c, dict) and c["choices"])
        == "ode"
    )


@pytest.mark.parametrize(
    "raw",
    [
        replay("The", " episode"[:3] + "X"),  # another way
        replay("The"),  # ended before the cut
        chat_chunk(role=True) + b'data: {"error":{"message":"context full"}}\n\n',
        chat_chunk(role=True) + b"data: [DONE]\n\n",
    ],
    ids=["another-way", "ends-early", "error", "done"],
)
def test_a_replay_that_does_not_reach_the_cut_the_same_way_raises_having_sent_nothing(raw: bytes) -> None:
    seam = ReplaySeam(read_partial(SO_FAR, "/chat/completions"), "/chat/completions")
    sent: list[bytes] = []

    def feed_bytewise() -> None:
        for i in range(len(raw)):
            sent.append(seam.feed(raw[i : i + 1]))

    with pytest.raises(SeamDiverged):
        feed_bytewise()
    assert b"".join(sent) == b""


def test_a_replayed_completion_is_checked_on_its_text() -> None:
    def text(piece: str, finish: str | None = None, ident: str = "a") -> bytes:
        chunk = {
            "id": f"cmpl-{ident}",
            "object": "text_completion",
            "choices": [{"text": piece, "index": 0, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    seam = ReplaySeam(read_partial(text("1,") + text(" 2"), "/completions"), "/completions")
    events = data(
        seam.feed(
            text("1,", ident="b") + text(" 2", ident="b") + text(",", ident="b") + text("", "length", "b")
        )
    )
    assert [(c["id"], c["choices"][0]["text"]) for c in events] == [("cmpl-a", ","), ("cmpl-a", "")]


def named(chunk: dict[str, Any]) -> bytes:
    return f"event: {chunk['type']}\n".encode() + b"data: " + json.dumps(chunk).encode() + b"\n\n"


def delta(text: str) -> bytes:
    return named({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


START = named(
    {
        "type": "message_start",
        "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": []},
    }
)
BLOCK = named({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
END = (
    named({"type": "content_block_stop", "index": 0})
    + named({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 3}})
    + named({"type": "message_stop"})
)


def test_a_replayed_anthropic_stream_goes_on_in_the_clients_open_block() -> None:
    seam = ReplaySeam(read_partial(START + BLOCK + delta("Hel"), "/messages"), "/messages")
    raw = seam.feed(START + BLOCK + delta("Hel") + delta("lo") + delta(" you") + END)
    kinds = [
        json.loads(line.removeprefix("data: "))["type"]
        for line in raw.decode().split("\n")
        if line.startswith("data: ")
    ]
    assert kinds == [
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert b'"text":"lo"' in raw


def test_a_replayed_anthropic_stream_that_stops_before_the_cut_raises() -> None:
    seam = ReplaySeam(read_partial(START + BLOCK + delta("Hello"), "/messages"), "/messages")
    with pytest.raises(SeamDiverged):
        seam.feed(START + BLOCK + delta("Hel") + END)


def test_a_replay_of_a_stream_cut_before_any_text_sends_no_second_opening() -> None:
    chat = ReplaySeam(read_partial(chat_chunk(role=True), "/chat/completions"), "/chat/completions")
    events = data(chat.feed(replay("Hi", " there")))
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    assert [c["choices"][0]["delta"] for c in chunks][:2] == [{"content": "Hi"}, {"content": " there"}]
    message = ReplaySeam(read_partial(START, "/messages"), "/messages")
    raw = message.feed(START + BLOCK + delta("Hi") + END)
    kinds = [
        json.loads(line.removeprefix("data: "))["type"]
        for line in raw.decode().split("\n")
        if line.startswith("data: ")
    ]
    assert kinds[:2] == ["content_block_start", "content_block_delta"]  # the client saw no block yet
    assert "message_start" not in kinds
