"""Usage read from answers as they pass: token counts and what the backend said of the prompt.

The relay hands every chunk of an answer to a ``UsageSniffer``, which finds ``usage`` (and
llama.cpp's ``timings``, and a response id when asked) in a JSON body or in server-sent events
without holding back or copying the stream; ``prompt_report`` turns what it found into the figures
the pool learns prompt caches from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_SNIFFED_BODY", "MAX_SNIFFED_EVENT", "PromptReport", "UsageSniffer", "count", "prompt_report"]

MAX_SNIFFED_BODY = 1 << 20  # a JSON answer larger than this is relayed, but its usage is not read
MAX_SNIFFED_EVENT = 1 << 20  # an event longer than this is relayed, but not read for usage


def count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class PromptReport:
    """What a backend said of a request's prompt: its tokens, how many it served from its cache,
    and, when it says (llama.cpp), the time it took to evaluate the rest and how many that was."""

    prompt_tokens: int
    cached_tokens: int | None = None
    prefill_seconds: float | None = None
    evaluated_tokens: int | None = None


def prompt_report(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> PromptReport | None:
    """From llama.cpp's ``timings`` (``cache_n``, ``prompt_n``, ``prompt_ms``) when present, else
    from ``usage``: OpenAI's ``prompt_tokens_details.cached_tokens``, the Responses API's
    ``input_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens`` (which its
    ``input_tokens`` do not include)."""
    if timings is not None:
        cached, evaluated = count(timings.get("cache_n")), count(timings.get("prompt_n"))
        took = timings.get("prompt_ms")
        if cached is not None and evaluated is not None and cached >= 0 and evaluated >= 0:
            seconds = took / 1000 if isinstance(took, int | float) and not isinstance(took, bool) else None
            return PromptReport(cached + evaluated, cached, seconds, evaluated)
    usage = usage or {}
    anthropic_cached = count(usage.get("cache_read_input_tokens"))
    if anthropic_cached is not None:
        uncached = count(usage.get("input_tokens")) or 0
        return PromptReport(
            uncached + anthropic_cached + (count(usage.get("cache_creation_input_tokens")) or 0),
            anthropic_cached,
        )
    prompt = count(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None:
        return None
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return PromptReport(prompt, cached)


class UsageSniffer:
    """Reads ``usage`` from the bytes passing through, without holding back or copying a stream.

    For event streams it keeps only the unfinished tail of the current event (at most
    ``MAX_SNIFFED_EVENT`` bytes: a longer event is skipped, not buffered), and parses only events that
    mention ``"usage"`` (OpenAI's final usage chunk, Anthropic's ``message_start`` and
    ``message_delta``, the Responses API's ``response.completed``; their counts are merged). Events
    end at a blank line in any of SSE's line endings (LF, CRLF, CR): line endings are folded to LF as
    bytes arrive, a CR that ends one chunk and an LF that starts the next counting once. Each byte is
    scanned once. For JSON it keeps the body up to ``MAX_SNIFFED_BODY``.

    With ``want_id`` it also reads the answer's ``id`` (a stored response's, from the JSON body or
    the stream's ``response.created`` event) into ``response_id``. llama.cpp's ``timings`` (on its
    last chunk, or in its answer) go into ``timings``.
    """

    def __init__(self, event_stream: bool, *, want_id: bool = False) -> None:
        self.event_stream = event_stream
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.want_id = want_id
        self.response_id: str | None = None
        self.finish_reasons: list[str] = []  # why the answer ended (OpenAI's and Anthropic's)
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for an event's end
        self._after_cr = False
        self._skipping = False  # inside an event too long to keep

    def feed(self, chunk: bytes) -> None:
        if not self.event_stream:
            if len(self._buffer) + len(chunk) <= MAX_SNIFFED_BODY:
                self._buffer += chunk
            return
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if not chunk:
            return
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        buffer += chunk
        while (end := buffer.find(b"\n\n", max(0, self._scanned - 1))) >= 0:
            event = buffer[:end]
            if not self._skipping and (
                b'"usage"' in event
                or b'"timings"' in event
                or (self.want_id and self.response_id is None)
                or _ends_a_choice(event)
            ):
                self._read(bytes(event).partition(b"data:")[2])
            self._skipping = False
            del buffer[: end + 2]
            self._scanned = 0
        self._scanned = len(buffer)
        if len(buffer) > MAX_SNIFFED_EVENT:
            self._skipping = True
            del buffer[:-1]  # the last byte may start the blank line that ends the event
            self._scanned = 1

    def finish(self) -> None:
        if not self.event_stream:
            self._read(bytes(self._buffer))
        self._buffer.clear()

    def _read(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(body, dict):
            return
        nested = body.get("message") or body.get("response")  # Anthropic's, the Responses API's
        for holder in (body, nested):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                self.usage = {**(self.usage or {}), **{k: v for k, v in usage.items() if v is not None}}
        timings = body.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        self._take_reasons(body)
        if self.want_id and self.response_id is None:
            holder = nested if isinstance(nested, dict) and self.event_stream else body
            given = holder.get("id")
            if isinstance(given, str):
                self.response_id = given

    def _take_reasons(self, body: dict[str, Any]) -> None:
        """OpenAI's ``choices[].finish_reason``, Anthropic's ``stop_reason`` (its message's, or a
        stream's ``message_delta``'s), at most a few."""
        reasons: list[Any] = []
        choices = body.get("choices")
        if isinstance(choices, list):
            reasons += [c.get("finish_reason") for c in choices[:8] if isinstance(c, dict)]
        delta = body.get("delta")
        for holder in (body, delta):
            if isinstance(holder, dict):
                reasons.append(holder.get("stop_reason"))
        for reason in reasons:
            if isinstance(reason, str) and reason not in self.finish_reasons and len(self.finish_reasons) < 8:
                self.finish_reasons.append(reason[:64])


def _ends_a_choice(event: bytes | bytearray) -> bool:
    """Whether an event may say why the answer ended (a finish or stop reason that is not null):
    only those are parsed for it, not every chunk."""
    if b'_reason"' not in event:
        return False
    return b'_reason":null' not in event and b'_reason": null' not in event
