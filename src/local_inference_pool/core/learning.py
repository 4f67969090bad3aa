"""What the pool learns from the servers' answers: what each prompt cache likely holds, how fast each
server evaluates a prompt, how long its leases last, and how many characters make a token.

Per backend and model, a prefix index records the prompts the backend was sent (``prompt_index``),
bounded by what the backend can hold; it is forgotten when the backend goes down or unloads the
model. Per backend, an average of the prefill time per uncached token, from llama.cpp's
``timings``; per model, an average of characters per token, from the prompt tokens servers count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from local_inference_pool.core.model import Affinity, Backend, Grant, Ticket
from local_inference_pool.core.prompt_index import (
    BLOCK_CHARS,
    DEFAULT_CHARS_PER_TOKEN,
    CacheStats,
    Ewma,
    PrefixIndex,
)

__all__ = ["CacheModel"]


class CacheModel:
    def __init__(
        self,
        clock: Callable[[], float],
        backends: Mapping[str, Backend],
        *,
        prefill_seconds_per_token: float,
        prefix_index_blocks: int,
    ) -> None:
        self.clock = clock
        self._backends = backends
        self.prefill_seconds_per_token = prefill_seconds_per_token  # before a backend reports its own
        self.prefix_index_blocks = prefix_index_blocks  # per backend and model, whatever it holds
        self.stats: dict[tuple[str, str], CacheStats] = {}  # (backend, model)
        self._prefixes: dict[tuple[str, str], PrefixIndex] = {}  # (backend, model) -> what it was sent
        self._chars_per_token: dict[str, Ewma] = {}  # per model

    def chars_per_token(self, model: str) -> float:
        """Characters of a rendered prompt per token the backends count, as learned for the model."""
        learned = self._chars_per_token.get(model)
        return DEFAULT_CHARS_PER_TOKEN if learned is None else learned.get(DEFAULT_CHARS_PER_TOKEN)

    def prefill(self, backend: Backend, tokens: float) -> float:
        """Seconds the backend is expected to take to evaluate ``tokens`` uncached prompt tokens."""
        return max(0.0, tokens) * backend.prefill_seconds.get(self.prefill_seconds_per_token)

    def cached_tokens(self, ticket: Ticket, backend: Backend, session_backend: str | None) -> float:
        """How many of the ticket's prompt tokens the backend likely holds: the leading blocks its
        index has, or, when it has none of them, the conversation's history where its session
        was last served (``session_backend``; another process of the fleet may have sent that).
        Not the larger of the two: where the index knows the prompt, it knows what was evicted
        since (bench/cache_sim.py measured the larger one costing 0.08 of the cached share)."""
        prompt = ticket.prompt
        if prompt is None or not prompt.cacheable:
            return 0.0
        index = self._prefixes.get((backend.name, ticket.model))
        chars = index.match(prompt.blocks) * BLOCK_CHARS if index is not None else 0
        if not chars and session_backend == backend.name:
            chars = prompt.history_chars
        return min(chars, prompt.chars) / self.chars_per_token(ticket.model)

    def sent(self, ticket: Ticket, backend: Backend, affinity: Affinity | None) -> None:
        """The backend is sent the ticket's prompt: its index holds it now; count a wait or a move."""
        assert ticket.prompt is not None
        key = (backend.name, ticket.model)
        index = self._prefixes.get(key)
        capacity = self._index_capacity(backend, ticket.model)
        if index is None:
            index = self._prefixes[key] = PrefixIndex(capacity)
        elif index.capacity != capacity:
            index.resize(capacity)
        index.record(ticket.prompt.blocks)
        if affinity is Affinity.WAITED and ticket.hold_started is not None:
            stats = self._stats(backend.name, ticket.model)
            stats.waits += 1
            stats.wait_seconds += self.clock() - ticket.hold_started
        elif affinity is Affinity.MOVED and ticket.moved_from in self._backends:
            assert ticket.moved_from is not None
            self._stats(ticket.moved_from, ticket.model).moved += 1

    def learn(
        self,
        grant: Grant,
        *,
        prompt_tokens: int | None,
        cached_tokens: int | None = None,
        prefill_seconds: float | None = None,
        evaluated_tokens: int | None = None,
    ) -> None:
        """What a backend reported of one answer: its prompt's tokens, how many it served from its
        cache, and (llama.cpp's ``timings``) how long it took to evaluate the rest."""
        backend, model = grant.backend, grant.model
        if prompt_tokens is None or prompt_tokens <= 0 or backend.removed:
            return
        cached = max(0, min(cached_tokens or 0, prompt_tokens))
        if prefill_seconds is not None and evaluated_tokens is not None and evaluated_tokens >= 16:
            per_token = prefill_seconds / evaluated_tokens  # a 1-token hit says nothing of prefill
            if 0.0 <= per_token <= 1.0:  # a broken or hostile report (NaN, infinite, absurd): ignored
                backend.prefill_seconds.add(per_token)
        prompt = grant.ticket.prompt
        if prompt is not None and prompt_tokens >= 16:
            ratio = min(16.0, max(0.5, prompt.chars / prompt_tokens))  # a broken count moves it little
            self._chars_per_token.setdefault(model, Ewma()).add(ratio)
        stats = self._stats(backend.name, model)
        stats.reports += 1
        stats.prompt_tokens += prompt_tokens
        stats.cached_tokens += cached
        stats.saved_seconds += self.prefill(backend, cached)

    def forget(self, backend: str) -> None:
        """The backend went down or away: nothing of its cache is known any more."""
        for key in [key for key in self._prefixes if key[0] == backend]:
            del self._prefixes[key]

    def forget_model(self, backend: str, model: str) -> None:
        """The backend unloaded the model: its prompts went with it."""
        self._prefixes.pop((backend, model), None)

    def forget_stats(self, backend: str) -> None:
        """A removed backend's figures go too (a backend added again under its name starts anew)."""
        for key in [key for key in self.stats if key[0] == backend]:
            del self.stats[key]

    def _index_capacity(self, backend: Backend, model: str) -> int:
        """In blocks: what the backend can hold (``cache_tokens``, else its slots times its context,
        8192 tokens when unknown), at most ``prefix_index_blocks``."""
        tokens = backend.cache_tokens or backend.slots * (backend.context or 8192)
        return max(1, min(self.prefix_index_blocks, int(tokens * self.chars_per_token(model) / BLOCK_CHARS)))

    def _stats(self, backend: str, model: str) -> CacheStats:
        stats = self.stats.get((backend, model))
        if stats is None:
            stats = self.stats[(backend, model)] = CacheStats()
        return stats
