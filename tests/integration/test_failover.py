"""Mid-stream failover: a stream whose backend dies continues on another, and the client's stream
reads as one. Two simulated llama.cpp servers under real uvicorn on 127.0.0.1, the pool in front."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local_inference_pool import BackendConfig
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

TOKENS = 20
UNINTERRUPTED = "".join(f"tok{i} " for i in range(TOKENS))


@dataclass
class Stack:
    url: str
    backends: list[SimulatedBackend]

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"{self.url}/v1", trust_env=False, timeout=20)

    async def status(self) -> dict[str, Any]:
        async with self.http() as http:
            return dict((await http.get("/pool/status")).json())


@asynccontextmanager
async def stack(lacks: tuple[str, ...] = (), **pool: Any) -> AsyncIterator[Stack]:
    config = SimulatorConfig(models=("sim",), slots=2, tokens_per_second=2000, lacks=lacks)
    backends = [SimulatedBackend(config) for _ in range(2)]
    llamacpp = lambda index, url: BackendConfig(url=url, name=f"b{index}", kind="llamacpp")  # noqa: E731
    async with started(backends, backend=llamacpp, public_status=True, **pool) as up:
        yield Stack(up.url, backends)


def body(route: str, **extra: Any) -> dict[str, Any]:
    common = {"model": "sim", "max_tokens": TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    if route == "/chat/completions":
        return {**common, "messages": [{"role": "user", "content": "count"}], **extra}
    return {**common, "prompt": "Counting:", **extra}


async def stream(http: httpx.AsyncClient, route: str, payload: dict[str, Any]) -> list[Any]:
    """The stream's data payloads, parsed (``[DONE]`` as the string)."""
    async with http.stream("POST", route, json=payload) as response:
        assert response.status_code == 200
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    events = []
    for event in raw.decode().split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def text_of(events: list[Any], route: str) -> str:
    pieces = []
    for event in events:
        if isinstance(event, dict) and event.get("choices"):
            choice = event["choices"][0]
            piece = (
                choice.get("delta", {}).get("content") if route == "/chat/completions" else choice.get("text")
            )
            pieces.append(piece or "")
    return "".join(pieces)


def assert_one_stream(events: list[Any], route: str) -> None:
    """Reads as one uninterrupted stream: the same text, one id, one end, one usage, [DONE] once."""
    chunks = [e for e in events if isinstance(e, dict)]
    assert "error" not in json.dumps(chunks)
    assert text_of(events, route) == UNINTERRUPTED
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert sum(1 for c in chunks for choice in c.get("choices", []) if choice.get("finish_reason")) == 1
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usages) == 1
    assert usages[0]["completion_tokens"] == TOKENS
    assert events.count("[DONE]") == 1
    assert events[-1] == "[DONE]"
    if route == "/chat/completions":
        roles = [c for c in chunks if c.get("choices") and "role" in c["choices"][0].get("delta", {})]
        assert len(roles) == 1


@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
async def test_a_stream_whose_backend_dies_continues_on_another_and_reads_as_one(route: str) -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 7
        events = await stream(http, route, body(route))
        status = await s.status()
        metrics = (await http.get("/pool/metrics")).text
    assert_one_stream(events, route)
    assert status["active_leases"] == 0
    assert 'lip_midstream_failovers_total{model="sim",outcome="continued"} 1.0' in metrics
    assert s.backends[1].stats.completed == 1  # the rest came from the other server


@pytest.mark.parametrize(
    ("lacks", "way"),
    [((), "token ids"), (("/completion",), "text"), (("/apply-template",), "text"), (("/tokenize",), "text")],
)
@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
async def test_llama_server_continues_by_token_ids_and_by_text_where_its_token_routes_are_missing(
    route: str, lacks: tuple[str, ...], way: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="local_inference_pool.gateway.midstream")
    if route == "/completions" and lacks == ("/apply-template",):
        way = "token ids"  # a completion has no template to render
    async with stack(lacks) as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 5
        events = await stream(http, route, body(route))
        status = await s.status()
    assert_one_stream(events, route)
    assert status["active_leases"] == 0
    assert f"continuing a stream of 'sim' on b1 by {way}" in caplog.text


@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
async def test_a_greedy_stream_is_replayed_and_checked_token_by_token(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="local_inference_pool.gateway.midstream")
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 7
        events = await stream(http, route, body(route, temperature=0))
        status = await s.status()
    assert_one_stream(events, route)
    assert status["active_leases"] == 0
    assert "continuing a stream of 'sim' on b1 by a replay" in caplog.text


async def test_a_replay_that_goes_another_way_sends_nothing_and_goes_on_from_the_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="local_inference_pool.gateway.midstream")
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 7
        s.backends[1].faults.differs_at = 4  # before the cut: the replay cannot be joined
        events = await stream(http, "/chat/completions", body("/chat/completions", seed=42))
        status = await s.status()
        metrics = (await http.get("/pool/metrics")).text
    assert_one_stream(events, "/chat/completions")
    assert status["active_leases"] == 0
    assert "the replay on b1 went another way" in caplog.text
    assert "continuing a stream of 'sim' on b1 by token ids" in caplog.text
    assert 'lip_midstream_failovers_total{model="sim",outcome="continued"} 1.0' in metrics


async def test_a_replay_past_the_cut_is_checked_only_up_to_it() -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 7
        s.backends[1].faults.differs_at = 12  # after the cut: what the server says goes
        events = await stream(http, "/chat/completions", body("/chat/completions", temperature=0))
    text = text_of(events, "/chat/completions")
    assert text.startswith("".join(f"tok{i} " for i in range(12)))
    assert "tok1012 " in text  # the replay's own answer from its tie on, as the server decided


async def test_replays_are_off_with_midstream_replay_tokens_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="local_inference_pool.gateway.midstream")
    async with stack(midstream_replay_tokens=0) as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 7
        events = await stream(http, "/chat/completions", body("/chat/completions", temperature=0))
    assert_one_stream(events, "/chat/completions")
    assert "by token ids" in caplog.text


async def test_the_access_log_names_both_backends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="local_inference_pool.access")
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 3
        await stream(http, "/chat/completions", body("/chat/completions"))
    lines = [r.getMessage() for r in caplog.records if r.name == "local_inference_pool.access"]
    assert any(
        "backend=b1" in line and "failed_over_from=b0" in line and "outcome=ok" in line for line in lines
    )


async def test_constrained_output_is_not_continued_and_ends_with_the_error_event() -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 3
        events = await stream(
            http, "/chat/completions", body("/chat/completions", response_format={"type": "json_object"})
        )
        metrics = (await http.get("/pool/metrics")).text
        status = await s.status()
    assert events[-1]["error"]["code"] == "upstream_failed"
    assert 'outcome="not_faithful"' in metrics
    assert status["active_leases"] == 0


async def test_when_the_continuation_dies_too_the_budget_ends_it_cleanly() -> None:
    async with stack() as s, s.http() as http:
        for backend in s.backends:
            backend.faults.die_after_tokens = 3
        events = await stream(http, "/chat/completions", body("/chat/completions"))
        metrics = (await http.get("/pool/metrics")).text
        status = await s.status()
    assert events[-1]["error"]["code"] == "upstream_failed"
    assert text_of(events, "/chat/completions") == "tok0 tok1 tok2 tok3 tok4 tok5 "  # no seam duplicated
    assert 'outcome="budget_spent"' in metrics
    assert status["active_leases"] == 0


async def test_midstream_failovers_zero_turns_it_off() -> None:
    async with stack(midstream_failovers=0) as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 3
        events = await stream(http, "/chat/completions", body("/chat/completions"))
    assert events[-1]["error"]["code"] == "upstream_failed"
    assert s.backends[1].stats.requests == 0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/chat/completions", "/completions"]), kill_at=st.integers(0, TOKENS - 1))
async def test_killed_at_any_point_the_client_gets_the_uninterrupted_text(route: str, kill_at: int) -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = kill_at
        events = await stream(http, route, body(route))
        with anyio.fail_after(5):
            while (await s.status())["active_leases"]:
                await anyio.sleep(0.01)
    assert_one_stream(events, route)


def named_events(raw: bytes) -> list[dict[str, Any]]:
    found = []
    for event in raw.decode().split("\n\n"):
        data = [line.removeprefix("data: ") for line in event.split("\n") if line.startswith("data: ")]
        if data:
            found.append(json.loads(data[0]))
    return found


@pytest.mark.parametrize("kill_at", [0, 1, 7, TOKENS - 1])
async def test_an_anthropic_stream_continues_and_its_event_sequence_stays_valid(kill_at: int) -> None:
    payload = {
        "model": "sim",
        "max_tokens": TOKENS,
        "stream": True,
        "messages": [{"role": "user", "content": "count"}],
    }
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = kill_at
        async with http.stream("POST", "/messages", json=payload) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        status = await s.status()
    events = named_events(raw)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start"
    assert kinds.count("message_start") == 1
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert {e["index"] for e in events if "index" in e} == {0}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == UNINTERRUPTED
    assert events[-2]["usage"]["output_tokens"] == TOKENS
    assert status["active_leases"] == 0


async def test_the_anthropic_sdk_reads_a_continued_stream_as_one_message() -> None:
    import anthropic

    async with stack() as s:
        s.backends[0].faults.die_after_tokens = 5
        async with (
            anthropic.AsyncAnthropic(base_url=s.url, api_key="unused", max_retries=0) as client,
            client.messages.stream(
                model="sim", max_tokens=TOKENS, messages=[{"role": "user", "content": "count"}]
            ) as stream,
        ):
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == UNINTERRUPTED
    assert final.usage.output_tokens == TOKENS
    assert final.stop_reason == "max_tokens"
