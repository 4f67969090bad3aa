"""The answer to a request an alias served names the model the client asked for.

A backend names the model it ran in every answer (``"model":"qwen2.5-7b"`` in a chat completion
and in each streamed chunk, in Anthropic's ``message_start``, in a Responses object). A client that
asked for ``claude-sonnet-4`` is answered with that name, as a cloud API would, and finds what ran
in the ``x-served-model`` header. The replacement works on the bytes as they pass, without parsing
them: the field as servers write it (``"model":"..."``, or with a space after the colon), with the
served name as JSON writes it. Inside a JSON string the quotes are escaped, so the text of an
answer is never changed. A chunk that ends with the start of the field holds back those few bytes
until the next one (an event ends with a blank line, so in practice nothing is held back).
"""

from __future__ import annotations

import json

__all__ = ["ModelEcho"]


class ModelEcho:
    def __init__(self, served: str, asked: str) -> None:
        served_json, asked_json = json.dumps(served).encode(), json.dumps(asked).encode()
        self._swaps = [
            (b'"model":' + served_json, b'"model":' + asked_json),
            (b'"model": ' + served_json, b'"model": ' + asked_json),
        ]
        self._longest = max(len(found) for found, _ in self._swaps)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The chunk with the asked name, less a tail that may be the start of the field."""
        data = self._held + chunk if self._held else chunk
        for found, put in self._swaps:
            if found in data:
                data = data.replace(found, put)
        keep = self._partial(data)
        self._held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        """What was held back, at the end of the answer."""
        held, self._held = self._held, b""
        return held

    def _partial(self, data: bytes) -> int:
        """The length of the longest tail of ``data`` that begins a field to replace."""
        start = max(0, len(data) - self._longest + 1)
        at = data.find(b'"', start)
        while at != -1:
            tail = data[at:]
            if any(found.startswith(tail) for found, _ in self._swaps):
                return len(tail)
            at = data.find(b'"', at + 1)
        return 0
