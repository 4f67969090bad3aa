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
the client's W3C ``traceparent``; a malformed or oversized one is ignored. The spans are made by a
tracer provider of the pool app's own (not the global one), and exported in batches by the SDK's
thread. When traces are off, ``Runtime.tracing`` is None and the request path checks only that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.telemetry_config import TelemetryConfig

__all__ = ["Tracing", "tracing_for", "wanted"]

MAX_TRACEPARENT = 512  # a longer traceparent or tracestate is not read (W3C's is 55 characters)
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


class Tracing:
    def __init__(self, telemetry: TelemetryConfig) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        service = os.environ.get("OTEL_SERVICE_NAME") or telemetry.service_name
        sampler = (
            None if telemetry.sample_ratio is None else ParentBased(TraceIdRatioBased(telemetry.sample_ratio))
        )
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=telemetry.otlp_endpoint))
        )
        self._tracer = self._provider.get_tracer("local_inference_pool")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    # --- one request -----------------------------------------------------------------------

    def start(self, record: RequestRecord, headers: Iterable[tuple[bytes, bytes]], dialect: str) -> None:
        """The request's span, from its arrival; its parent the host's span, else the client's."""
        trace = self._trace
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in headers
                if name in (b"traceparent", b"tracestate") and len(value) <= MAX_TRACEPARENT
            }
            parent = self._propagator.extract(carrier) if carrier else None
        record.started_ns = time.time_ns() - int((time.monotonic() - record.started) * 1e9)
        operation = _OPERATIONS.get(record.route, record.route.strip("/").replace("/", "."))
        record.span = self._tracer.start_span(
            f"{operation} {record.model}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=record.started_ns,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": dialect,
                "gen_ai.system": dialect,
                "gen_ai.request.model": record.model,
                "lip.route": record.route,
                "lip.key": record.key,
                "lip.request_id": record.request_id,
            },
        )

    def attempt(
        self, record: RequestRecord, backend: str, url: str, *, waited: float, reason: str | None
    ) -> list[tuple[bytes, bytes]]:
        """A span for one request sent upstream (the previous one, if any, failed); the headers
        that carry it to the server."""
        span = record.span
        if span is None:
            return []
        if not span.is_recording():  # sampled out: nothing to record, only the context to pass on
            return self.propagation(record)
        trace = self._trace
        context = trace.set_span_in_context(span)
        if record.attempt_span is None and waited > 0.0005:
            self._queue_span(record, context, waited, reason)
        previous = record.attempt_span
        if previous is not None:
            previous.set_status(trace.Status(trace.StatusCode.ERROR, "failed; sent to another backend"))
            previous.end()
        attempt = self._tracer.start_span(
            f"POST {backend}",
            context=context,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "lip.backend": backend,
                "server.address": url,
                "lip.failover": record.first_byte is not None,  # the client had bytes already
                "lip.attempt": record.attempts + 1,
            },
        )
        record.attempt_span = attempt
        record.attempts += 1
        return self.propagation(record)

    def propagation(self, record: RequestRecord) -> list[tuple[bytes, bytes]]:
        """The headers that carry the current attempt's span (else the request's) to a server."""
        span = record.attempt_span or record.span
        if span is None:
            return []
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return [(name.encode(), value.encode()) for name, value in carrier.items()]

    def finish(self, record: RequestRecord) -> None:
        """The request ended: its figures on its span, its open spans ended."""
        span = record.span
        if span is None:
            return
        trace = self._trace
        record.span = None
        if not span.is_recording():
            span.end()
            return
        now = time.time_ns()
        if record.first_byte is not None:
            first = record.started_ns + int(record.first_byte * 1e9)
            self._tracer.start_span(
                "time to first token", context=trace.set_span_in_context(span), start_time=record.started_ns
            ).end(end_time=first)
            span.set_attribute("lip.ttft_ms", round(record.first_byte * 1000, 1))
        attributes: dict[str, Any] = {
            "gen_ai.response.model": record.model,
            "lip.backend": record.backend,
            "lip.outcome": record.outcome,
            "http.response.status_code": record.status,
        }
        for name, value in (
            ("gen_ai.usage.input_tokens", record.prompt_tokens),
            ("gen_ai.usage.cache_read.input_tokens", record.cached_tokens),
            ("gen_ai.usage.output_tokens", record.completion_tokens),
            ("lip.queue_wait_ms", None if record.queue_wait is None else round(record.queue_wait * 1000, 1)),
        ):
            if value is not None:
                attributes[name] = value
        if record.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = record.finish_reasons
        if record.failed_over_from:
            attributes["lip.failed_over_from"] = list(record.failed_over_from)
        span.set_attributes(attributes)
        failed = record.status >= 500 or record.status == 0 or record.outcome == "failed_midway"
        attempt = record.attempt_span
        if attempt is not None:
            record.attempt_span = None
            attempt.set_attribute("http.response.status_code", record.status)
            if failed:
                attempt.set_status(trace.Status(trace.StatusCode.ERROR, record.outcome))
            attempt.end(end_time=now)
        if failed:
            span.set_attribute("error.type", record.outcome)
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.outcome))
        span.end(end_time=now)

    def _queue_span(self, record: RequestRecord, context: Any, waited: float, reason: str | None) -> None:
        """The wait for a slot, which ended as the first attempt starts."""
        granted = time.time_ns()
        attributes = {"lip.wait.reason": reason or "slots"}
        queued = self._tracer.start_span(
            "queue wait", context=context, start_time=granted - int(waited * 1e9), attributes=attributes
        )
        queued.end(end_time=granted)

    def shutdown(self) -> None:
        """Export what is left (bounded by the SDK's timeouts) and stop; blocking: run in a thread."""
        self._provider.shutdown()
