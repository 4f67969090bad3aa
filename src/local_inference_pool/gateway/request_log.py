"""Every request as one JSON line, the last ones kept for the dashboard, and (opt-in) their bodies.

``[telemetry] request_log`` sends each finished request as one JSON object per line to stderr or to
a file, rotated at ``request_log_max_bytes`` (``request_log_backups`` kept). Its fields are the
access log's, with the time, the ids and every timing. The last ``recent_requests`` entries are
kept in a ring, which ``GET /pool/requests`` and the dashboard show.

With ``capture = true`` (never on by default) the pool also keeps, for the last
``capture_max_requests`` requests, the request's headers and body and the answer's body, each cut
at ``capture_max_bytes``, with secrets redacted: the credential headers, JSON fields named like a
credential (``api_key``, ``authorization``, ``password``, ``secret``, ``token``...), and bearer
tokens and ``sk-`` keys anywhere in the text.

The logger is the pool app's own (``logging.Logger``, not from the logging module's registry), so
two pool apps in one process never share a file, and the host's logging is not touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import re
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.telemetry_config import TelemetryConfig

__all__ = ["REDACTED", "Capture", "RequestLog", "redact_headers", "redact_text"]

REDACTED = "[redacted]"
_SECRET_FIELD = re.compile(
    r"(?i)^(authorization|proxy[-_]authorization|x[-_]api[-_]key|api[-_]?key|apikey|password|passwd|"
    r"secret|client[-_]secret|access[-_]token|refresh[-_]token|id[-_]token|token|cookie|set[-_]cookie|"
    r"private[-_]key)$"
)
_SECRET_TEXT = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|\bsk-[A-Za-z0-9_-]{8,}")
_SECRET_HEADERS = {b"authorization", b"proxy-authorization", b"x-api-key", b"cookie"}
MAX_PARSED = 1 << 20  # a JSON body longer than this is redacted as text only


@dataclass
class Capture:
    """One request's bodies as they pass, each kept up to ``limit`` bytes."""

    limit: int
    headers: dict[str, str] = field(default_factory=dict)
    request: bytes = b""
    response: bytearray = field(default_factory=bytearray)
    request_size: int = 0
    response_size: int = 0

    def take_request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.headers = redact_headers(headers)
        self.request, self.request_size = body, len(body)

    def add_response(self, chunk: bytes) -> None:
        self.response_size += len(chunk)
        room = self.limit - len(self.response)
        if room > 0:
            self.response += chunk[:room]

    def shown(self) -> dict[str, Any]:
        return {
            "request_headers": self.headers,
            "request_body": redact_text(self.request, self.limit),
            "request_bytes": self.request_size,
            "response_body": redact_text(bytes(self.response), self.limit),
            "response_bytes": self.response_size,
        }


def redact_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers as text, with every credential replaced."""
    shown: dict[str, str] = {}
    for name, value in headers[:64]:
        key = name.decode("latin-1").lower()
        shown[key] = REDACTED if name.lower() in _SECRET_HEADERS else value.decode("latin-1")[:512]
    return shown


def redact_text(body: bytes, limit: int) -> str:
    """``body`` as text at most ``limit`` characters, secrets replaced: by field for JSON, by
    pattern for any text (an event stream, a form, a body cut short)."""
    text = body.decode("utf-8", "replace")
    if len(body) <= MAX_PARSED and text[:1] in ("{", "["):
        with contextlib.suppress(ValueError, RecursionError):  # not JSON after all: as text
            text = json.dumps(_redact_fields(json.loads(text)), ensure_ascii=False)
    text = _SECRET_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _redact_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(key, str) and _SECRET_FIELD.match(key) else _redact_fields(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact_fields(item) for item in value]
    return value


class RequestLog:
    def __init__(self, telemetry: TelemetryConfig) -> None:
        self.telemetry = telemetry
        # What each recent request said, made into its entry only when the dashboard asks: formatting
        # it at every request's end cost more than anything else the log does.
        self.recent: deque[_Said] = deque(maxlen=telemetry.recent_requests)
        self._captured: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._logger: logging.Logger | None = None
        self._handler: logging.Handler | None = None
        self._open(telemetry)

    def reconfigure(self, telemetry: TelemetryConfig) -> None:
        """A reload's telemetry: the log reopened where it changed, the rings resized."""
        old, self.telemetry = self.telemetry, telemetry
        if (telemetry.request_log, telemetry.request_log_max_bytes, telemetry.request_log_backups) != (
            old.request_log,
            old.request_log_max_bytes,
            old.request_log_backups,
        ):
            self.close()
            self._open(telemetry)
        if telemetry.recent_requests != old.recent_requests:
            self.recent = deque(self.recent, maxlen=telemetry.recent_requests)
        while len(self._captured) > telemetry.capture_max_requests:
            self._captured.popitem(last=False)

    def capture_for(self) -> Capture | None:
        """A capture for a request starting now, when bodies are captured."""
        telemetry = self.telemetry
        if not telemetry.capture or telemetry.capture_max_requests == 0:
            return None
        return Capture(telemetry.capture_max_bytes)

    def write(self, record: RequestRecord, duration: float) -> None:
        """The request ended: its line written, its entry (and capture) kept."""
        if self._logger is None and self.recent.maxlen == 0 and record.capture is None:
            return
        said = _Said._make((*_read_said(record), duration, time.time()))
        self.recent.append(said)
        if self._logger is None and record.capture is None:
            return
        entry = _entry(said)
        if self._logger is not None:
            self._logger.info(json.dumps(entry, separators=(",", ":")))
        if record.capture is not None:
            self._captured[record.request_id] = {"entry": entry, "capture": record.capture}
            self._captured.move_to_end(record.request_id)
            while len(self._captured) > self.telemetry.capture_max_requests:
                self._captured.popitem(last=False)

    def entries(self) -> list[dict[str, Any]]:
        """The recent requests, newest first."""
        entries = [_entry(said) for said in reversed(self.recent)]
        return [{**entry, "captured": entry["request_id"] in self._captured} for entry in entries]

    def detail(self, request_id: str, *, bodies: bool) -> dict[str, Any] | None:
        """One recent request: its entry, and its captured bodies when there are and ``bodies``."""
        captured = self._captured.get(request_id)
        if captured is not None:
            entry = dict(captured["entry"])
            if bodies:
                entry["capture"] = captured["capture"].shown()
            return entry
        return next((_entry(said) for said in reversed(self.recent) if said.request_id == request_id), None)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
        self._logger = self._handler = None

    def _open(self, telemetry: TelemetryConfig) -> None:
        where = telemetry.request_log
        if not where:
            return
        handler: logging.Handler
        if where == "stderr":
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.handlers.RotatingFileHandler(
                where,
                maxBytes=telemetry.request_log_max_bytes,
                backupCount=telemetry.request_log_backups,
                encoding="utf-8",
                delay=True,
            )
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger("local_inference_pool.requests", logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
        self._logger, self._handler = logger, handler


class _Said(NamedTuple):
    """A request's fields as they were when it ended, with its duration and the wall time it ended."""

    request_id: str
    route: str
    key: str
    model: str
    asked: str
    fallback_from: str
    backend: str
    status: int
    outcome: str
    queue_wait: float | None
    first_byte: float | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    affinity: str
    retries: int
    failed_over_from: list[str]
    duration: float
    ended: float


_read_said = attrgetter(*_Said._fields[:-2])  # the record's fields in one call


def _entry(said: _Said) -> dict[str, Any]:
    now = said.ended
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "request_id": said.request_id,
        "route": said.route,
        "key": said.key,
        "model": said.model,
        "model_asked": said.asked or said.model,  # the name the client used (an alias's)
        "fallback_from": said.fallback_from or None,  # the model a fallback stood in for
        "backend": said.backend,
        "status": said.status,
        "outcome": said.outcome,
        "queue_wait_ms": _ms(said.queue_wait),
        "ttfb_ms": _ms(said.first_byte),
        "duration_ms": round(said.duration * 1000, 1),
        "prompt_tokens": said.prompt_tokens,
        "cached_tokens": said.cached_tokens,
        "completion_tokens": said.completion_tokens,
        "affinity": said.affinity,
        "retries": said.retries,
        "failed_over_from": list(said.failed_over_from),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
