"""The process that encodes and exports the pool's spans, so that the gateway's own does not.

Why a process: encoding a span to OTLP's protobuf costs about 30 µs of Python, and the SDK's batch
processor does it in a thread of the process it runs in, where it holds the same interpreter lock
as the event loop. Measured at 32 concurrent requests, tracing every request that way cost the
gateway a third of its requests per second, against a backend that answers at once and against
one that takes 20 ms alike, because the gateway's one core was the limit in both. Here the gateway
only keeps each finished request's spans as plain rows and writes them, in batches of JSON lines,
to the stdin of a Python process running this module's ``main()``, which builds the SDK's
finished spans from them and hands them to the SDK's ``BatchSpanProcessor`` and OTLP/HTTP
exporter. The protocol stays the SDK's; the exporter reads its standard ``OTEL_*`` variables,
which the process inherits.

The gateway's side (``SpanExportProcess``) is bounded: rows wait in a buffer of ``MAX_PENDING``
requests, more are dropped and counted (a warning says how many, at most once a minute); a process
that dies is started again after a pause that doubles up to ``MAX_RESTART_PAUSE``, and one that
falls behind makes the buffer fill, not the gateway wait. The exporting process stops when its
stdin closes: as the pool stops, what is left is written, stdin is closed, and the process exports
its last batch (bounded by the SDK's timeouts and ``STOP_TIMEOUT``).

A row is one span: ``[name, kind, trace_id, span_id, parent_span_id, parent_is_remote,
trace_state, start_ns, end_ns, status_code, status_description, attributes]``, with 0 for no
parent and '' for no trace state; ``kind`` and ``status_code`` are the SDK enums' values.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

__all__ = ["Row", "SpanExportProcess", "main", "readable_spans"]

logger = logging.getLogger(__name__)

Row = list[Any]
FLUSH_INTERVAL = 0.2  # seconds between writes of the buffered rows
MAX_PENDING = 8192  # requests whose spans wait to be written; more are dropped
LINE_REQUESTS = 64  # requests per line written (about 0.5 ms of encoding on the event loop)
MAX_RESTART_PAUSE = 30.0
STOP_TIMEOUT = 15.0  # for the process to export what is left as the pool stops
DROP_WARNING_INTERVAL = 60.0


class SpanExportProcess:
    """The gateway's end: a buffer of finished requests' spans and the task that writes it."""

    def __init__(self, endpoint: str | None, service_name: str, *, max_pending: int = MAX_PENDING) -> None:
        self._settings = json.dumps({"endpoint": endpoint, "service_name": service_name})
        self._max_pending = max_pending
        self._pending: deque[list[Row]] = deque()
        self._process: anyio.abc.Process | None = None
        self._pause = 1.0
        self._start_after = 0.0  # monotonic time before which a dead process is not started again
        self.dropped = 0  # requests whose spans were dropped, since the start
        self._dropped_told = 0
        self._told_at = -math.inf

    def put(self, rows: list[Row]) -> None:
        """One finished request's spans, to be written; dropped when the buffer is full."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append(rows)

    @property
    def pid(self) -> int | None:
        """The exporting process's id while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The process and the writing task while the pool runs; what is left exported at the end."""
        try:
            await self._started()  # at once: it takes the SDK a moment to load, and a failure shows
            async with anyio.create_task_group() as group:
                group.start_soon(self._write_periodically)
                try:
                    yield
                finally:
                    group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()

    async def _write_periodically(self) -> None:
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            await self._write()
            self._tell_drops()

    async def _write(self) -> None:
        """Write the buffered rows, starting the process if it is not running."""
        while self._pending:
            process = await self._started()
            if process is None or process.stdin is None:
                self.dropped += len(self._pending)
                self._pending.clear()
                return
            batch = [self._pending.popleft() for _ in range(min(LINE_REQUESTS, len(self._pending)))]
            line = json.dumps([row for rows in batch for row in rows], separators=(",", ":"))
            try:
                await process.stdin.send(line.encode() + b"\n")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.dropped += len(batch)
                await self._lost(process)
                return
            self._pause = 1.0

    async def _started(self) -> anyio.abc.Process | None:
        """The running process: started when there is none and its pause has passed."""
        if self._process is not None and self._process.returncode is None:
            return self._process
        if self._process is not None:
            await self._lost(self._process)
            return None
        if time.monotonic() < self._start_after:
            return None
        try:
            process = await anyio.open_process(
                [sys.executable, "-c", f"from {__name__} import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the exporter's own complaints go where the gateway's log goes
                start_new_session=True,  # out of the terminal's process group: Ctrl-C is the gateway's
            )
            assert process.stdin is not None
            await process.stdin.send(self._settings.encode() + b"\n")
        except OSError as exc:
            logger.warning("traces: the span export process did not start (%s); spans are dropped", exc)
            self._hold_off()
            return None
        self._process = process
        return process

    async def _lost(self, process: anyio.abc.Process) -> None:
        with anyio.move_on_after(1):
            await process.wait()
        if process.returncode is None:  # its stdin broke, yet it runs: it goes, not left behind
            process.kill()
            await process.wait()
        logger.warning(
            "traces: the span export process ended (exit status %s); starting another in %.0f s",
            process.returncode,
            self._pause,
        )
        self._process = None
        self._hold_off()

    def _hold_off(self) -> None:
        self._start_after = time.monotonic() + self._pause
        self._pause = min(self._pause * 2, MAX_RESTART_PAUSE)

    def _tell_drops(self) -> None:
        now = time.monotonic()
        if self.dropped > self._dropped_told and now - self._told_at >= DROP_WARNING_INTERVAL:
            logger.warning(
                "traces: %d requests' spans dropped (the span export process was behind or down)",
                self.dropped - self._dropped_told,
            )
            self._dropped_told, self._told_at = self.dropped, now

    async def _stop(self) -> None:
        """Write what is left, close the process's stdin and let it export its last batch."""
        with anyio.move_on_after(STOP_TIMEOUT):
            self._start_after = 0.0
            await self._write()
        process = self._process
        self._process = None
        if process is None:
            return
        with anyio.move_on_after(STOP_TIMEOUT):
            if process.stdin is not None:
                await process.stdin.aclose()
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- the exporting process --------------------------------------------------------------------


def readable_spans(rows: Iterable[Sequence[Any]], resource: Any, scope: Any) -> list[Any]:
    """The SDK's finished spans (``ReadableSpan``) for rows."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan

    sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    spans = []
    for row in rows:
        name, kind, trace_id, span_id, parent_id, remote, state, start, end, code, description, attrs = row
        trace_state = trace.TraceState.from_header([state]) if state else None
        parent = None
        if parent_id:
            parent = trace.SpanContext(trace_id, parent_id, bool(remote), sampled, trace_state)
        attributes = {key: tuple(value) if isinstance(value, list) else value for key, value in attrs.items()}
        spans.append(
            ReadableSpan(
                name,
                context=trace.SpanContext(trace_id, span_id, False, sampled, trace_state),
                parent=parent,
                resource=resource,
                attributes=attributes,
                kind=trace.SpanKind(kind),
                status=trace.Status(trace.StatusCode(code), description or None),
                start_time=start,
                end_time=end,
                instrumentation_scope=scope,
            )
        )
    return spans


def main() -> None:
    """Read rows from stdin, a JSON list per line after a first line of settings, and export them
    until stdin closes."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    # It stops when its stdin closes: the gateway closes it as it stops, and the system does when
    # the gateway dies. A service manager's SIGTERM to every process of the service (or a Ctrl-C,
    # had it been in the terminal's process group) would otherwise end it before it exports what
    # the gateway writes last.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = json.loads(sys.stdin.readline() or "{}")
    resource = Resource.create({"service.name": settings.get("service_name", "local-inference-pool")})
    scope = InstrumentationScope("local_inference_pool")
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.get("endpoint")))
    try:
        for line in sys.stdin:
            try:
                spans = readable_spans(json.loads(line), resource, scope)
            except (ValueError, TypeError) as exc:  # never from the gateway; said, not fatal
                print(f"span export: a line was not spans ({exc})", file=sys.stderr)
                continue
            for span in spans:
                processor.on_end(span)
    finally:
        processor.shutdown()  # type: ignore[no-untyped-call]
