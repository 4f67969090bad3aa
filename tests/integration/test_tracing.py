"""OpenTelemetry traces of real requests, exported by the span export process to an OTLP/HTTP
receiver of the tests' own (``tests/otlp.py``): a streamed chat, a queued request, a failed-over
stream, and a request to the pool mounted in FastAPI with the client's ``traceparent``."""

from __future__ import annotations

import secrets

import anyio
import httpx
import pytest
from fastapi import FastAPI

from local_inference_pool import BackendConfig, PoolConfig, create_pool_app, pool_lifespan
from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig
from local_inference_pool.telemetry_config import TelemetryConfig

from ..otlp import receiver
from .stack import started

pytestmark = pytest.mark.anyio

CHAT = {"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


def traced(endpoint: str) -> TelemetryConfig:
    return TelemetryConfig(traces=True, otlp_endpoint=endpoint)


async def test_a_streamed_and_a_queued_chat_have_their_spans() -> None:
    sims = [SimulatedBackend(SimulatorConfig(models=("sim",), slots=1, tokens_per_second=400))]
    async with (
        receiver() as spans,
        started(sims, telemetry=traced(spans.url), public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):

        async def chat() -> None:
            await http.post("/chat/completions", json=STREAM)

        async with anyio.create_task_group() as group:
            for _ in range(2):  # one slot: the second waits for the first
                group.start_soon(chat)
        status = (await http.get("/pool/status")).json()
        assert status["traces"] == {"exporting": True, "dropped": 0}
        # The pool stopped: its last spans were exported on the way.
    roots = spans.named("chat sim")
    assert len(roots) == 2
    for root in roots:
        assert root.kind == 2  # SERVER
        assert root.parent_id == ""
        attributes = root.attributes
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.request.model"] == "sim"
        assert attributes["gen_ai.response.model"] == "sim"
        assert attributes["gen_ai.usage.output_tokens"] == 8
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert "gen_ai.usage.cache_read.input_tokens" in attributes
        assert attributes["gen_ai.response.finish_reasons"] == ["length"]
        assert attributes["lip.backend"] == "b0"
        assert attributes["http.response.status_code"] == 200
        names = sorted(child.name for child in spans.children(root))
        assert "POST b0" in names
        assert "time to first token" in names
        attempt = next(child for child in spans.children(root) if child.name == "POST b0")
        assert attempt.kind == 3  # CLIENT
        assert attempt.trace_id == root.trace_id
    waited = [child for root in roots for child in spans.children(root) if child.name == "queue wait"]
    assert len(waited) == 1
    assert waited[0].attributes["lip.wait.reason"] == "slots"
    # Each server got the traceparent of its attempt's span.
    seen = [headers["traceparent"] for headers in sims[0].stats.seen_headers if "traceparent" in headers]
    assert {value.split("-")[1] for value in seen} == {root.trace_id for root in roots}


async def test_a_failed_over_stream_has_an_attempt_on_each_backend() -> None:
    config = SimulatorConfig(models=("sim",), slots=2, tokens_per_second=2000)
    sims = [SimulatedBackend(config) for _ in range(2)]
    llamacpp = lambda index, url: BackendConfig(url=url, name=f"b{index}", kind="llamacpp")  # noqa: E731
    async with (
        receiver() as spans,  # left last: the pool exports its spans as it stops
        started(sims, backend=llamacpp, telemetry=traced(spans.url), public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        sims[0].faults.die_after_tokens = 3
        async with http.stream("POST", "/chat/completions", json={**STREAM, "max_tokens": 12}) as answer:
            await answer.aread()
    (root,) = spans.named("chat sim")
    attempts = sorted(
        (span for span in spans.children(root) if span.name.startswith("POST")),
        key=lambda s: s.attributes["lip.attempt"],
    )
    assert [a.name for a in attempts] == ["POST b0", "POST b1"]
    assert attempts[0].error
    assert attempts[1].attributes["lip.failover"] is True
    assert root.attributes["lip.failed_over_from"] == ["b0"]
    assert not root.error


async def test_mounted_in_fastapi_the_pools_span_is_a_child_of_the_clients_traceparent() -> None:
    sim = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=2000))
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    async with receiver() as spans, running(sim) as sim_url:
        config = PoolConfig(
            backends=(BackendConfig(url=sim_url, name="gpu"),),
            health_interval=0.2,
            telemetry=traced(spans.url),
        )
        pool_app = create_pool_app(config)
        host = FastAPI(lifespan=pool_lifespan(pool_app))
        host.mount("/v1", pool_app)
        async with (
            running(host) as url,
            httpx.AsyncClient(base_url=f"{url}/v1", trust_env=False, timeout=20) as http,
        ):
            with anyio.fail_after(10):
                while not (await http.get("/models")).json().get("data"):
                    await anyio.sleep(0.02)
            given = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
            assert (await http.post("/chat/completions", json=CHAT, headers=given)).status_code == 200
            malformed = {"traceparent": "00-zz-" + "x" * 5000}
            assert (await http.post("/chat/completions", json=CHAT, headers=malformed)).status_code == 200
            garbage = {"traceparent": "not a traceparent", "tracestate": "=" * 100}
            assert (await http.post("/chat/completions", json=CHAT, headers=garbage)).status_code == 200
    roots = spans.named("chat sim")
    assert len(roots) == 3
    child = next(root for root in roots if root.trace_id == trace_id)
    assert child.parent_id == parent_id
    others = [root for root in roots if root is not child]
    assert all(root.parent_id == "" and root.trace_id != trace_id for root in others)  # ignored, new traces


def test_traces_are_on_with_the_standard_variables_and_off_by_default() -> None:
    from local_inference_pool.gateway.tracing import wanted

    assert not wanted(TelemetryConfig(), {})
    assert wanted(TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "console,otlp"})
    assert wanted(TelemetryConfig(traces=True), {})
    assert not wanted(TelemetryConfig(traces=True), {"OTEL_SDK_DISABLED": "true"})
