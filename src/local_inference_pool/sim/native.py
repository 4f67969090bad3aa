"""llama-server's own routes in the simulator: ``/tokenize``, ``/apply-template`` and the native
``/completion`` stream, as BACKENDS.md section 1 records them, enough for mid-stream failover by
token ids to run against it.

The simulator's vocabulary: a generated word ``tokN`` is token ``TOKEN_BASE + N``; any other word is
its length (as before, so ``hello big world`` is ``[5, 3, 5]``); the BOS is token 1. A prompt of ids
that holds N generated tokens goes on from ``tokN``, as a real server goes on from its prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["TOKEN_BASE", "native_chunk", "native_final", "render", "start_of", "tokenize"]

TOKEN_BASE: Final = 1_000_000
BOS: Final = 1
_GENERATED = re.compile(r"tok(\d+)")


def _word_ids(text: str) -> list[int]:
    ids = []
    for word in text.split():
        generated = _GENERATED.fullmatch(word)
        ids.append(TOKEN_BASE + int(generated.group(1)) if generated else len(word))
    return ids


def tokenize(content: Any, *, add_special: bool) -> list[int]:
    """A string, or a list of strings and ids tokenized one by one (llama-server's mixed prompt)."""
    parts = content if isinstance(content, list) else [content]
    ids: list[int] = [BOS] if add_special else []
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            ids.append(part)
        else:
            ids.extend(_word_ids(str(part)))
    return ids


def render(messages: Any) -> str:
    """A chat template: each message on its own line after its role, then the assistant's turn."""
    lines = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        lines.append(f"<|{message.get('role')}|> {content or ''}\n")
    return "".join(lines) + "<|assistant|> "


def start_of(prompt: Any) -> int:
    """Where an answer to a prompt of ids goes on: after the generated tokens it holds."""
    ids = prompt if isinstance(prompt, list) else tokenize(str(prompt), add_special=False)
    return sum(1 for token in ids if isinstance(token, int) and token >= TOKEN_BASE)


def native_chunk(text: str, index: int, predicted: int, evaluated: int) -> bytes:
    chunk = {
        "index": 0,
        "content": text,
        "tokens": [TOKEN_BASE + index],
        "stop": False,
        "id_slot": -1,
        "tokens_predicted": predicted,
        "tokens_evaluated": evaluated,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def native_final(model: str, predicted: int, evaluated: int, timings: dict[str, Any]) -> bytes:
    """The last event of a native stream: no ``[DONE]`` follows on this route."""
    chunk = {
        "index": 0,
        "content": "",
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": model,
        "tokens_predicted": predicted,
        "tokens_evaluated": evaluated,
        "generation_settings": {"n_predict": predicted},
        "prompt": "",
        "has_new_line": False,
        "truncated": False,
        "stop_type": "limit",
        "stopping_word": "",
        "tokens_cached": evaluated + predicted,
        "timings": timings,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
