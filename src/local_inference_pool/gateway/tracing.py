"""OpenTelemetry traces of the pool's requests, exported over OTLP/HTTP: off unless asked for.

On with ``[telemetry] traces = true`` or the standard ``OTEL_TRACES_EXPORTER=otlp`` (and never with
``OTEL_SDK_DISABLED=true``); it needs the SDK and the exporter (``pip install
local-inference-pool[otel]``). The endpoint, headers and sampler follow ``[telemetry]``, else the
standard ``OTEL_*`` variables, which the SDK and the exporter read themselves.

Per request, with the GenAI semantic conventions:

- one span (kind SERVER) named ``{operation} {model}``: ``gen_ai.operation.name``,
  ``gen_ai.provider.name`` (and the older ``gen_ai.system``: the API's dialect),
  ``gen_ai.request.model`` and ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.usage.output_tokens``,
  ``gen_ai.response.finish_reasons``, the backend, the key's name, the status and the outcome;
- a child ``queue wait`` with ``lip.wait.reason`` (``slots``, ``drain_guard``, ``cache_hold``,
  ``tenant_share``) when it waited;
- a child (kind CLIENT) per upstream attempt, ``POST {backend}``, a failed one marked as an error,
  a mid-stream failover's with ``lip.failover``; each sends its ``traceparent`` to the server;
- a child ``time to first token``, from the request's arrival to the first byte relayed.

The parent is the host's current span when a traced host (FastAPI, Django) serves the pool, else
the client's W3C ``traceparent``; a malformed or oversized one is ignored. The sampler is the SDK's
(``[telemetry] sample_ratio``, else ``OTEL_TRACES_SAMPLER``), asked once per request.

While a request runs, this module keeps only its ids and times (a ``RequestTrace``) and writes the
``traceparent`` each server gets; when it ends, its spans become plain rows, which
``gateway.span_export`` encodes and exports in a process of its own. The SDK's ``start_span`` and
``end`` cost about 50 µs a span (sampling, checking each attribute, locks) and its encoding about
30 µs more, which made tracing every request cost the gateway a third of its throughput. When
traces are off, ``Runtime.tracing`` is None and the request path checks only that.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.span_export import Row, SpanExportProcess
from local_inference_pool.telemetry_config import TelemetryConfig

__all__ = ["RequestTrace", "Tracing", "tracing_for", "wanted"]

MAX_TRACEPARENT = 512  # a longer traceparent or tracestate is not read (W3C's is 55 characters)
MAX_MODEL = 256  # of a model's name in a span's name and attributes
_OPERATIONS = {
    "/chat/completions": "chat",
    "/messages": "chat",
    "/responses": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
}


def wanted(telemetry: TelemetryConfig, environ: Any = os.environ) -> bool:
    """Whether traces are on: ``[telemetry] traces``, or ``OTEL_TRACES_EXPORTER`` naming otlp;
    never with ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    return telemetry.traces or "otlp" in exporters


def tracing_for(telemetry: TelemetryConfig) -> Tracing | None:
    """The app's tracing, or None when traces are off; ``ConfigError`` when they are asked for
    and the SDK is not installed."""
    if not wanted(telemetry):
        return None
    try:
        return Tracing(telemetry)
    except ImportError:
        raise ConfigError(
            "telemetry.traces: OpenTelemetry's SDK and OTLP exporter are not installed: "
            "pip install 'local-inference-pool[otel]'"
        ) from None


@dataclass(slots=True)
class Attempt:
    """One request sent upstream: its span's id and times (``ended_ns`` 0 while it runs)."""

    span_id: int
    backend: str
    url: str
    number: int
    failover: bool  # the client had bytes already: a mid-stream failover
    started_ns: int
    ended_ns: int = 0


@dataclass(slots=True)
class RequestTrace:
    """A request's trace while it runs: ids and times, from which its spans are built at its end."""

    trace_id: int
    span_id: int
    parent: Any  # the SpanContext of the host's span or the client's traceparent; None for none
    sampled: bool
    trace_state: str  # the W3C tracestate passed on, '' for none
    operation: str
    dialect: str
    started_ns: int
    queued: tuple[int, int, str] | None = None  # the wait for a slot: start, end, why
    attempts: list[Attempt] = field(default_factory=list)


class Tracing:
    """Traces of the pool's requests. ``sink`` takes each sampled request's spans as rows when it
    ends; by default they go to the span export process, which runs while ``running()`` does."""

    def __init__(self, telemetry: TelemetryConfig, sink: Callable[[list[Row]], None] | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
            raise ImportError("the OTLP exporter, which the span export process needs")  # found at start

        sampler = (
            None if telemetry.sample_ratio is None else ParentBased(TraceIdRatioBased(telemetry.sample_ratio))
        )
        provider = TracerProvider(sampler=sampler)  # for its sampler (else OTEL_TRACES_SAMPLER's) and ids
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self._sampled = Decision.RECORD_AND_SAMPLE
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._export: SpanExportProcess | None = None
        if sink is None:
            service = os.environ.get("OTEL_SERVICE_NAME") or telemetry.service_name
            self._export = SpanExportProcess(telemetry.otlp_endpoint, service)
            sink = self._export.put
        self._sink = sink

    def state(self) -> dict[str, Any]:
        """For the status: whether the span export process runs, and the requests whose spans
        were dropped since the start."""
        export = self._export
        return {
            "exporting": export is not None and export.pid is not None,
            "dropped": export.dropped if export is not None else 0,
        }

    def running(self) -> AbstractAsyncContextManager[None]:
        """The span export process while the pool runs; at the end, what is left exported."""
        return self._export.running() if self._export is not None else _nothing()

    # --- while a request runs: ids and times only ------------------------------------------

    def start(self, record: RequestRecord, headers: Iterable[tuple[bytes, bytes]], dialect: str) -> None:
        """The request's trace, from its arrival; its parent the host's span, else the client's."""
        trace = self._trace
        context = None  # the current one: a traced host's span
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in headers
                if name in (b"traceparent", b"tracestate") and len(value) <= MAX_TRACEPARENT
            }
            if carrier:
                context = self._propagator.extract(carrier)
                parent = trace.get_current_span(context).get_span_context()
        operation = _OPERATIONS.get(record.route, record.route.strip("/").replace("/", "."))
        trace_id = parent.trace_id if parent.is_valid else self._ids.generate_trace_id()
        decision = self._sampler.should_sample(
            context, trace_id, f"{operation} {record.model[:MAX_MODEL]}", trace.SpanKind.SERVER
        )
        record.trace = RequestTrace(
            trace_id=trace_id,
            span_id=self._ids.generate_span_id(),
            parent=parent if parent.is_valid else None,
            sampled=decision.decision is self._sampled,
            trace_state=decision.trace_state.to_header() if decision.trace_state else "",
            operation=operation,
            dialect=dialect,
            started_ns=time.time_ns() - int((time.monotonic() - record.started) * 1e9),
        )

    def attempt(
        self, record: RequestRecord, backend: str, url: str, *, waited: float, reason: str | None
    ) -> list[tuple[bytes, bytes]]:
        """One more request sent upstream (the previous one, if any, failed); the headers that
        carry its span to the server."""
        traced: RequestTrace | None = record.trace
        if traced is None:
            return []
        if not traced.sampled:  # nothing to record: only the context to pass on
            return self.propagation(record)
        now = time.time_ns()
        if not traced.attempts and waited > 0.0005:
            traced.queued = (now - int(waited * 1e9), now, reason or "slots")
        if traced.attempts:
            traced.attempts[-1].ended_ns = now
        traced.attempts.append(
            Attempt(
                span_id=self._ids.generate_span_id(),
                backend=backend,
                url=url,
                number=len(traced.attempts) + 1,
                failover=record.first_byte is not None,
                started_ns=now,
            )
        )
        return self.propagation(record)

    def propagation(self, record: RequestRecord) -> list[tuple[bytes, bytes]]:
        """The W3C headers that carry the current attempt's span (else the request's) to a server."""
        traced: RequestTrace | None = record.trace
        if traced is None:
            return []
        span_id = traced.attempts[-1].span_id if traced.attempts else traced.span_id
        flags = "01" if traced.sampled else "00"
        headers = [(b"traceparent", f"00-{traced.trace_id:032x}-{span_id:016x}-{flags}".encode())]
        if traced.trace_state:
            headers.append((b"tracestate", traced.trace_state.encode("latin-1")))
        return headers

    # --- at its end: the spans ---------------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        """The request ended: its spans, with its figures, to the sink."""
        traced: RequestTrace | None = record.trace
        if traced is None:
            return
        record.trace = None
        if not traced.sampled:
            return
        now = time.time_ns()
        failed = record.status >= 500 or record.status == 0 or record.outcome == "failed_midway"
        rows = [self._root(record, traced, failed, now)]
        if traced.queued is not None:
            start, end, reason = traced.queued
            rows.append(self._child("queue wait", traced, _INTERNAL, start, end, {"lip.wait.reason": reason}))
        for attempt in traced.attempts:
            rows.append(self._attempt(record, traced, attempt, failed, now))
        if record.first_byte is not None:
            first = traced.started_ns + int(record.first_byte * 1e9)
            rows.append(self._child("time to first token", traced, _INTERNAL, traced.started_ns, first, {}))
        self._sink(rows)

    def _root(self, record: RequestRecord, traced: RequestTrace, failed: bool, now: int) -> Row:
        model = record.model[:MAX_MODEL]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": traced.operation,
            "gen_ai.provider.name": traced.dialect,
            "gen_ai.system": traced.dialect,
            "gen_ai.request.model": (record.asked or record.model)[:MAX_MODEL],
            "gen_ai.response.model": model,
            "lip.route": record.route,
            "lip.key": record.key,
            "lip.request_id": record.request_id,
            "lip.backend": record.backend,
            "lip.outcome": record.outcome,
            "http.response.status_code": record.status,
        }
        for name, value in (
            ("gen_ai.usage.input_tokens", record.prompt_tokens),
            ("gen_ai.usage.cache_read.input_tokens", record.cached_tokens),
            ("gen_ai.usage.output_tokens", record.completion_tokens),
            ("lip.queue_wait_ms", None if record.queue_wait is None else round(record.queue_wait * 1000, 1)),
            ("lip.ttft_ms", None if record.first_byte is None else round(record.first_byte * 1000, 1)),
        ):
            if value is not None:
                attributes[name] = value
        if record.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = [str(reason) for reason in record.finish_reasons]
        if record.failed_over_from:
            attributes["lip.failed_over_from"] = list(record.failed_over_from)
        status, description = _UNSET, ""
        if failed:
            attributes["error.type"] = record.outcome
            status, description = _ERROR, record.outcome
        parent = traced.parent
        return [
            f"{traced.operation} {model}",
            _SERVER,
            traced.trace_id,
            traced.span_id,
            parent.span_id if parent is not None else 0,
            parent is not None and parent.is_remote,
            traced.trace_state,
            traced.started_ns,
            now,
            status,
            description,
            attributes,
        ]

    def _attempt(
        self, record: RequestRecord, traced: RequestTrace, attempt: Attempt, failed: bool, now: int
    ) -> Row:
        """An attempt's span: one that a later attempt followed failed; the last ends with the
        request, and failed if the request did."""
        attributes: dict[str, Any] = {
            "lip.backend": attempt.backend,
            "server.address": attempt.url,
            "lip.failover": attempt.failover,
            "lip.attempt": attempt.number,
        }
        status, description = _UNSET, ""
        if attempt.ended_ns:
            status, description = _ERROR, "failed; sent to another backend"
        else:
            attributes["http.response.status_code"] = record.status
            if failed:
                status, description = _ERROR, record.outcome
        row = self._child(
            f"POST {attempt.backend}",
            traced,
            _CLIENT,
            attempt.started_ns,
            attempt.ended_ns or now,
            attributes,
        )
        row[3], row[9], row[10] = attempt.span_id, status, description
        return row

    def _child(
        self, name: str, traced: RequestTrace, kind: int, start: int, end: int, attributes: dict[str, Any]
    ) -> Row:
        """A child of the request's span, for a stretch of its time."""
        span_id = self._ids.generate_span_id()
        return [
            name,
            kind,
            traced.trace_id,
            span_id,
            traced.span_id,
            False,
            traced.trace_state,
            start,
            end,
            _UNSET,
            "",
            attributes,
        ]


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


# The SDK's SpanKind and StatusCode values, which rows carry (span_export reads them back).
_INTERNAL, _SERVER, _CLIENT = 0, 1, 2
_UNSET, _ERROR = 0, 2
