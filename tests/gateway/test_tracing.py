"""The spans ``gateway.tracing`` makes from a request's ids and times, as the span export process
builds them from its rows: their parents, their attributes, a failover's attempts, the sampler's say, and
the ``traceparent`` each server gets."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.span_export import Row, readable_spans
from local_inference_pool.gateway.tracing import Tracing
from local_inference_pool.telemetry_config import TelemetryConfig


class Traced:
    def __init__(self, sample_ratio: float | None = None) -> None:
        self.rows: list[Row] = []
        self.tracing = Tracing(TelemetryConfig(traces=True, sample_ratio=sample_ratio), self.rows.extend)

    def spans(self) -> dict[str, ReadableSpan]:
        """The spans the rows given so far stand for, by name, as the span export process builds
        them; encoded as the SDK's exporter would, and decoded again."""
        spans = readable_spans(
            json.loads(json.dumps(self.rows)), Resource.create({}), InstrumentationScope("t")
        )
        encode_spans(spans).SerializeToString()
        return {span.name: span for span in spans}


@pytest.fixture
def traced() -> Traced:
    return Traced()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _record(**fields: object) -> RequestRecord:
    record = RequestRecord(request_id="r-1", model="qwen", key="team")
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_a_request_makes_a_server_span_with_its_children_and_sends_its_attempts_context(
    traced: Traced,
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    record = _record()
    traced.tracing.start(record, [(b"traceparent", f"00-{trace_id}-{parent_id}-01".encode())], "openai")
    (header,) = traced.tracing.attempt(record, "gpu", "http://gpu:8080", waited=0.25, reason="cache_hold")
    record.first_byte, record.status, record.backend = 0.3, 200, "gpu"
    record.prompt_tokens, record.completion_tokens, record.finish_reasons = 12, 4, ["stop"]
    traced.tracing.finish(record)

    spans = traced.spans()
    assert set(spans) == {"chat qwen", "queue wait", "POST gpu", "time to first token"}
    root = spans["chat qwen"]
    assert root.context is not None
    assert root.parent is not None
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == parent_id
    assert attributes(root)["gen_ai.usage.input_tokens"] == 12
    assert attributes(root)["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes(root)["lip.key"] == "team"
    for child in ("queue wait", "POST gpu", "time to first token"):
        parent = spans[child].parent
        assert parent is not None
        assert parent.span_id == root.context.span_id
    assert attributes(spans["queue wait"])["lip.wait.reason"] == "cache_hold"
    attempt = spans["POST gpu"]
    assert attempt.context is not None
    assert header == (b"traceparent", f"00-{trace_id}-{attempt.context.span_id:016x}-01".encode())
    first = spans["time to first token"]
    assert first.end_time is not None
    assert first.start_time is not None
    assert first.end_time - first.start_time == pytest.approx(0.3e9, rel=1e-6)
    assert record.trace is None  # ended once: its spans are made once


def test_a_failover_ends_the_first_attempt_as_failed_and_marks_the_second(traced: Traced) -> None:
    record = _record()
    traced.tracing.start(record, [], "anthropic")
    traced.tracing.attempt(record, "a", "http://a", waited=0.0, reason=None)
    record.first_byte = 0.01  # the client had bytes: the next attempt is a mid-stream failover
    traced.tracing.attempt(record, "b", "http://b", waited=0.0, reason=None)
    record.status, record.failed_over_from = 200, ["a"]
    traced.tracing.finish(record)

    spans = traced.spans()
    assert "queue wait" not in spans  # it did not wait
    first, second = spans["POST a"], spans["POST b"]
    assert not first.status.is_ok
    assert attributes(first)["lip.failover"] is False
    assert second.status.is_unset
    assert attributes(second)["lip.failover"] is True
    assert attributes(second)["lip.attempt"] == 2
    assert attributes(spans["chat qwen"])["lip.failed_over_from"] == ("a",)
    assert spans["chat qwen"].parent is None  # no traceparent: a trace of its own


def test_a_failed_request_marks_its_span_and_its_last_attempt_as_errors(traced: Traced) -> None:
    record = _record(route="/embeddings")
    traced.tracing.start(record, [], "openai")
    traced.tracing.attempt(record, "gpu", "http://gpu", waited=0.0, reason=None)
    record.status, record.outcome = 502, "upstream_error"
    traced.tracing.finish(record)

    spans = traced.spans()
    root = spans["embeddings qwen"]
    assert not root.status.is_ok
    assert attributes(root)["error.type"] == "upstream_error"
    assert not spans["POST gpu"].status.is_ok
    assert "time to first token" not in spans


def test_a_sampled_out_request_exports_nothing_and_passes_its_context_on_unsampled() -> None:
    traced = Traced(sample_ratio=0.0)
    record = _record()
    traced.tracing.start(record, [], "openai")
    (header,) = traced.tracing.attempt(record, "gpu", "http://gpu", waited=1.0, reason=None)
    assert header[1].endswith(b"-00")
    traced.tracing.finish(record)
    assert traced.spans() == {}


@pytest.mark.parametrize(
    "headers",
    [
        [(b"traceparent", b"00-zz-" + b"x" * 5000)],
        [(b"traceparent", b"not a traceparent"), (b"tracestate", b"=" * 100)],
        [(b"traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01")],  # all-zero ids are invalid
    ],
)
def test_a_malformed_traceparent_is_ignored(traced: Traced, headers: list[tuple[bytes, bytes]]) -> None:
    record = _record()
    traced.tracing.start(record, headers, "openai")
    traced.tracing.finish(record)
    assert traced.spans()["chat qwen"].parent is None


def test_the_clients_tracestate_is_passed_on(traced: Traced) -> None:
    record = _record()
    parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01".encode()
    traced.tracing.start(record, [(b"traceparent", parent), (b"tracestate", b"vendor=abc")], "openai")
    headers = dict(traced.tracing.propagation(record))
    assert headers[b"tracestate"] == b"vendor=abc"
    traced.spans()
