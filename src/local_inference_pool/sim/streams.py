"""How the simulator's answers go out over time: a slot held, the prompt evaluated, then one token
every ``1 / tokens_per_second`` seconds, as OpenAI chunks, llama-server's native chunks or named
events (Anthropic's Messages, OpenAI's Responses). A fault may cut a stream after N tokens, or make an
answer from its start take the other side of a tie (``differs_at``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

from local_inference_pool.sim import native
from local_inference_pool.sim.answers import Reply
from local_inference_pool.sim.slots import Slots

__all__ = ["Faults", "Streams", "event", "sse"]


@dataclass
class Faults:
    """Knobs a test turns; each applies to every request that arrives while it is set."""

    status: int | None = None  # answer every completion with this status and an error body
    hang: bool = False  # accept the request and never answer
    die_after_tokens: int | None = None  # drop the connection mid-stream after this many tokens
    delay_headers: float = 0.0  # wait this long before sending headers
    # An answer from its start (no prefill) goes another way from this token on, as a server whose
    # arithmetic differs in the last bits takes the other side of a near tie.
    differs_at: int | None = None


class Streams:
    def __init__(self, faults: Faults, slots: Slots, tokens_per_second: float, chunk_padding: int) -> None:
        self.faults = faults
        self.slots = slots
        self._token_seconds = 1 / tokens_per_second
        self._padding = chunk_padding  # extra bytes in every OpenAI chunk

    async def evaluate_prompt(self, reply: Reply) -> None:
        if reply.prompt_seconds:
            await anyio.sleep(reply.prompt_seconds)

    async def _numbers(self, reply: Reply) -> AsyncIterator[int]:
        """The numbers of the reply's tokens as they are generated (``tokN``)."""
        die_after, differs = self.faults.die_after_tokens, self.faults.differs_at
        for index in range(reply.tokens):
            if die_after is not None and index >= die_after:
                raise ConnectionAbortedError("simulated backend died mid-stream")
            await anyio.sleep(self._token_seconds)
            number = reply.start + index
            if differs is not None and reply.start == 0 and not reply.prefill and number >= differs:
                number += 1000  # the other side of the tie, and all that follows from it
            yield number

    async def openai(self, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
        """OpenAI's chat or completion chunks, ``[DONE]`` last."""
        async with self.slots.slot(reply.model):
            await self.evaluate_prompt(reply)
            yield sse(reply.chunk(role=True))
            if reply.prefill:  # as llama-server: a continued answer echoes the prefill first
                yield sse(reply.chunk(text=reply.prefill))
            async for number in self._numbers(reply):
                chunk = reply.chunk(text=f"tok{number} ")
                if self._padding:
                    chunk["padding"] = "." * self._padding
                yield sse(chunk)
            yield sse(reply.chunk(finish=True, timings=not include_usage))
            if include_usage:
                yield sse(reply.usage_chunk())
            yield b"data: [DONE]\n\n"
        self.slots.stats.completed += 1

    async def native(self, reply: Reply) -> AsyncIterator[bytes]:
        """llama-server's native stream: one token a chunk, a final chunk with ``stop``, no ``[DONE]``."""
        async with self.slots.slot(reply.model):
            await self.evaluate_prompt(reply)
            index = 0
            async for number in self._numbers(reply):
                index += 1
                yield native.native_chunk(f"tok{number} ", number, index, reply.prompt_tokens)
            yield native.native_final(reply.model, reply.tokens, reply.prompt_tokens, reply.timings())
        self.slots.stats.completed += 1

    async def named(self, reply: Reply) -> AsyncIterator[bytes]:
        """A streamed answer of Anthropic's Messages or OpenAI's Responses API: named events."""
        async with self.slots.slot(reply.model):
            await self.evaluate_prompt(reply)
            for name, data in reply.opening_events():
                yield event(name, data)
            if reply.prefill:  # as llama-server: a continued answer echoes the prefill first
                yield event(*reply.delta_event(reply.prefill))
            async for number in self._numbers(reply):
                yield event(*reply.delta_event(f"tok{number} "))
            for name, data in reply.closing_events():
                yield event(name, data)
        self.slots.stats.completed += 1


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + sse(data)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
