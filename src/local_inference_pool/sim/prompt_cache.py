"""The simulator's prompt cache: the prompts it was sent, as llama.cpp's slots and host cache hold them.

Each prompt is kept as the digests of its prefixes, one per whole message, so a prompt's reused part
is its longest run of leading messages some held prompt shares. A prompt that extends a held one
replaces it, as a slot's cache grows with its conversation; beyond ``capacity`` prompts the least
recently used go first.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

__all__ = ["PromptCache"]


class PromptCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # 0: every prompt is kept
        self._held: OrderedDict[tuple[str, ...], None] = OrderedDict()  # prompts, as prefix digests

    def __len__(self) -> int:
        return len(self._held)

    def look_up(self, body: dict[str, Any], *, remember: bool = True) -> tuple[int, int]:
        """Prompt tokens, and how many of them (whole messages from the start) it holds."""
        messages = body.get("messages", body.get("input"))
        parts = (
            [json.dumps(m, sort_keys=True) for m in messages]
            if isinstance(messages, list)
            else [str(body.get("prompt", messages or ""))]
        )
        system = body.get("system")
        if system:
            parts.insert(0, json.dumps(system, sort_keys=True))
        digests = tuple(_digest(parts[: end + 1]) for end in range(len(parts)))
        total = sum(len(p) // 4 + 1 for p in parts)
        best = 0
        for held in self._held:
            common = 0
            for mine, theirs in zip(digests, held, strict=False):
                if mine != theirs:
                    break
                common += 1
            best = max(best, common)
        cached = sum(len(p) // 4 + 1 for p in parts[:best])
        if remember:
            for held in [h for h in self._held if digests[: len(h)] == h and h != digests]:
                del self._held[held]
            self._held[digests] = None
            self._held.move_to_end(digests)
            if self.capacity:
                while len(self._held) > self.capacity:
                    self._held.popitem(last=False)
        return total, min(cached, total - 1) if cached else 0


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
