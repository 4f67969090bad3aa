"""What the pool knows about the backends' prompt caches: pure values, no I/O.

A request's prompt is read as its rendered text cut into fixed blocks of characters, each block's
hash chained to the ones before it (as vLLM and SGLang chain their KV blocks), so two prompts share
their first ``n`` block hashes exactly when their texts share their first ``n`` blocks. Each
backend (per model) keeps an LRU index of the block hashes it was sent, bounded by what it can hold
(``capacity_tokens``): the longest run of a prompt's leading blocks found there is what that backend
is likely to have cached. It is an estimate, not a mirror of the server's KV cache: the backends
report what they actually reused (``cached_tokens``, llama.cpp's ``timings``), and the pool learns
its figures (prefill time per token, characters per token, how long a lease lasts) from those.

Hashes are Python's own, salted per process: an index is never shared between processes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BLOCK_CHARS",
    "CacheStats",
    "Ewma",
    "PrefixIndex",
    "Prompt",
    "prompt_of",
]

BLOCK_CHARS: Final = 256  # about 64 tokens of English: coarse enough to be cheap, fine enough to match
MAX_BLOCKS: Final = 2048  # a prompt's first 512 K characters are indexed; beyond that, nothing more
DEFAULT_CHARS_PER_TOKEN: Final = 4.0


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as the placement sees it.

    ``blocks``: the chained hashes of its full leading blocks; ``chars``: its rendered length;
    ``history_chars``: the length of what came before its last message (what the backend that
    served the conversation's previous turn holds).
    """

    blocks: tuple[int, ...]
    chars: int
    history_chars: int = 0

    @property
    def cacheable(self) -> bool:
        """Whether any of it can count as cached somewhere (a prompt under one block cannot)."""
        return bool(self.blocks) or self.history_chars > 0


def prompt_of(parts: Sequence[str], *, model: str) -> Prompt:
    """The prompt of a request whose rendered text is ``parts`` joined (the last part its newest
    message). The chain starts from the model's name: a prompt cached for one model is no hit for
    another on the same server."""
    text = "".join(parts)
    chars = len(text)
    previous = hash(model)
    blocks: list[int] = []
    for start in range(0, min(chars // BLOCK_CHARS, MAX_BLOCKS) * BLOCK_CHARS, BLOCK_CHARS):
        previous = hash((previous, text[start : start + BLOCK_CHARS]))
        blocks.append(previous)
    history = chars - len(parts[-1]) if len(parts) > 1 else 0
    return Prompt(tuple(blocks), chars, history)


class PrefixIndex:
    """The block hashes one backend was sent for one model, least recently used first out."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)  # in blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, blocks: Sequence[int]) -> int:
        """How many of the prompt's leading blocks are here."""
        held = self._blocks
        count = 0
        for block in blocks:
            if block not in held:
                break
            count += 1
        return count

    def record(self, blocks: Sequence[int]) -> None:
        """The backend was sent this prompt: it holds its blocks now, the most recent of all. A
        prompt longer than the capacity keeps its first blocks (a later block without its prefix is
        no hit)."""
        held = self._blocks
        for block in blocks[: self.capacity]:
            if block in held:
                held.move_to_end(block)
            else:
                held[block] = None
        while len(held) > self.capacity:
            held.popitem(last=False)

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclass(slots=True)
class Ewma:
    """An exponentially weighted mean; ``None`` until its first sample."""

    weight: float = 0.2
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass(slots=True)
class CacheStats:
    """What one backend's prompt cache did for one model, as the backend reported it and as the
    pool placed requests for it."""

    prompt_tokens: int = 0  # reported by the backend
    cached_tokens: int = 0  # of those, served from its cache
    saved_seconds: float = 0.0  # cached tokens times the learned prefill time per token (estimated)
    waits: int = 0  # requests that waited for this backend's cache and got it
    wait_seconds: float = 0.0  # how long they waited for it beyond a slot elsewhere
    moved: int = 0  # requests whose cache was here, that went elsewhere (waiting cost more)
    reports: int = field(default=0, repr=False)
