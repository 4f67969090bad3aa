from __future__ import annotations

import json

import anyio
import httpx
import pytest

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

pytestmark = pytest.mark.anyio


def client_for(backend: SimulatedBackend) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=backend), base_url="http://sim")


async def test_answers_the_llama_cpp_shapes() -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("a", "b"), slots=3))
    async with client_for(backend) as client:
        health = await client.get("/health")
        props = (await client.get("/props")).json()
        slots = (await client.get("/slots")).json()
        models = (await client.get("/v1/models")).json()
        chat = (
            await client.post(
                "/v1/chat/completions",
                json={"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
            )
        ).json()
        completion = (
            await client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
        ).json()
        embedding = (await client.post("/v1/embeddings", json={"model": "a", "input": ["x", "y"]})).json()
    assert health.json() == {"status": "ok"}
    assert props["total_slots"] == 3
    assert [s["is_processing"] for s in slots] == [False, False, False]
    assert [m["id"] for m in models["data"]] == ["a", "b"]
    assert chat["choices"][0]["message"]["content"] == "tok0 tok1 "
    assert chat["usage"]["completion_tokens"] == 2
    assert completion["choices"][0]["text"] == "tok0 tok1 "
    assert [len(e["embedding"]) for e in embedding["data"]] == [8, 8]


async def test_streams_sse_with_usage_and_done() -> None:
    backend = SimulatedBackend(SimulatorConfig(tokens_per_second=1000))
    body = {
        "model": "sim-model",
        "stream": True,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
        "messages": [],
    }
    async with client_for(backend) as client:
        text = (await client.post("/v1/chat/completions", json=body)).text
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_queues_beyond_its_slots_inside_and_reports_peak() -> None:
    backend = SimulatedBackend(SimulatorConfig(slots=2, tokens_per_second=200))
    async with running(backend) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:

        async def one() -> None:
            response = await client.post(
                "/v1/chat/completions", json={"model": "sim-model", "messages": [], "max_tokens": 4}
            )
            assert response.status_code == 200  # never 503 for load, like llama-server

        async with anyio.create_task_group() as group:
            for _ in range(7):
                group.start_soon(one)
    assert backend.peak_running == 2
    assert backend.stats.completed == 7


async def test_answers_loading_on_every_path_while_it_starts() -> None:
    backend = SimulatedBackend(SimulatorConfig(startup_seconds=60))
    async with client_for(backend) as client:
        for path in ("/health", "/props", "/v1/models"):
            response = await client.get(path)
            assert response.status_code == 503
            assert response.json()["error"]["message"] == "Loading model"


async def test_loading_another_model_costs_the_load_delay() -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("a", "b"), load_seconds=0.2, tokens_per_second=10_000))
    async with client_for(backend) as client:
        await client.post("/v1/chat/completions", json={"model": "a", "messages": [], "max_tokens": 1})
        assert backend.stats.model_loads == 0  # "a" was loaded: no load delay
        await client.post("/v1/chat/completions", json={"model": "b", "messages": [], "max_tokens": 1})
    assert backend.loaded == ["b"]
    assert backend.stats.model_loads == 1


async def test_reports_prompt_cache_reuse_for_a_continued_conversation() -> None:
    backend = SimulatedBackend()
    turn1 = [{"role": "system", "content": "be brief " * 20}, {"role": "user", "content": "hello"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    async with client_for(backend) as client:
        first = (
            await client.post("/v1/chat/completions", json={"model": "sim-model", "messages": turn1})
        ).json()
        second = (
            await client.post("/v1/chat/completions", json={"model": "sim-model", "messages": turn2})
        ).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["timings"]["cache_n"] == second["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_faults() -> None:
    backend = SimulatedBackend(SimulatorConfig(tokens_per_second=1000))
    async with client_for(backend) as client:
        backend.faults.status = 500
        failed = await client.post("/v1/chat/completions", json={"model": "sim-model", "messages": []})
        backend.faults.status = None
        backend.faults.hang = True
        with anyio.move_on_after(0.2) as hung:
            await client.post("/v1/chat/completions", json={"model": "sim-model", "messages": []})
    assert failed.status_code == 500
    assert hung.cancelled_caught


async def test_dies_mid_stream_on_a_real_connection() -> None:
    backend = SimulatedBackend(SimulatorConfig(tokens_per_second=1000))
    backend.faults.die_after_tokens = 2
    body = {"model": "sim-model", "stream": True, "max_tokens": 10, "messages": []}
    received: list[bytes] = []

    async def read_stream(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for chunk in response.aiter_bytes():
                received.append(chunk)

    async with running(backend) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_stream(client)
    assert b"tok1 " in b"".join(received)
    assert b"[DONE]" not in b"".join(received)


async def test_api_key_guards_all_but_health_and_models() -> None:
    backend = SimulatedBackend(SimulatorConfig(api_key="secret"))
    async with client_for(backend) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/props")).status_code == 401
        ok = await client.get("/props", headers={"authorization": "Bearer secret"})
    assert ok.status_code == 200


async def test_its_prompt_cache_is_bounded_and_its_prefill_takes_the_uncached_part() -> None:
    backend = SimulatedBackend(SimulatorConfig(cached_prompts=1, prefill_tokens_per_second=10_000))
    system = {"role": "system", "content": "be brief " * 200}

    def chat(*messages: dict[str, str]) -> dict[str, object]:
        return {"model": "sim-model", "max_tokens": 2, "messages": [system, *messages]}

    async with client_for(backend) as client:
        one = (await client.post("/v1/chat/completions", json=chat({"role": "user", "content": "a"}))).json()
        answer = {"role": "assistant", "content": one["choices"][0]["message"]["content"]}
        again = (
            await client.post(
                "/v1/chat/completions",
                json=chat({"role": "user", "content": "a"}, answer, {"role": "user", "content": "b"}),
            )
        ).json()
        other = (
            await client.post(
                "/v1/chat/completions",
                json={"model": "sim-model", "messages": [{"role": "user", "content": "c"}]},
            )
        ).json()
        evicted = (
            await client.post("/v1/chat/completions", json=chat({"role": "user", "content": "a"}))
        ).json()
    assert one["timings"]["cache_n"] == 0
    assert one["timings"]["prompt_ms"] == pytest.approx(one["usage"]["prompt_tokens"] / 10)
    assert again["timings"]["cache_n"] > 400  # the whole first turn and its answer
    assert again["timings"]["prompt_ms"] < one["timings"]["prompt_ms"] / 10
    assert other["timings"]["cache_n"] == 0
    assert evicted["timings"]["cache_n"] == 0  # one prompt held: the other request's
