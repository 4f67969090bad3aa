"""An OTLP/HTTP trace receiver on 127.0.0.1 for tests: it decodes each export with
opentelemetry-proto (protobuf, as the SDK's exporter sends) and keeps the spans."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from local_inference_pool.gateway.serving import running


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    error: bool


@dataclass
class Receiver:
    url: str
    spans: list[Span] = field(default_factory=list)

    def named(self, prefix: str) -> list[Span]:
        return [span for span in self.spans if span.name.startswith(prefix)]

    def children(self, parent: Span) -> list[Span]:
        return [span for span in self.spans if span.parent_id == parent.span_id]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind)


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (protobuf, as the SDK's exporter sends)."""
    found = Receiver("")

    async def traces(request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    found.spans.append(
                        Span(
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            {a.key: _value(a.value) for a in span.attributes},
                            span.status.code == 2,
                        )
                    )
        return Response(b"", media_type="application/x-protobuf")

    async with running(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])) as url:
        found.url = f"{url}/v1/traces"
        yield found
