"""Every API family through the pool under real uvicorn on 127.0.0.1, simulated backends behind it,
the official clients in front: Anthropic's SDK on /messages, OpenAI's on /responses and audio, and
llama.cpp's root routes; each route's errors in its own dialect."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest
from anthropic.types import MessageParam

from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

KEY = "sk-pool"
MESSAGES: list[MessageParam] = [{"role": "user", "content": "hello"}]


@dataclass
class Stack:
    url: str
    backends: list[SimulatedBackend]

    def anthropic(self, key: str = KEY) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0, timeout=20)

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=20)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"{self.url}/v1", headers={"authorization": f"Bearer {KEY}"}, trust_env=False, timeout=20
        )

    async def status(self) -> dict[str, Any]:
        async with self.http() as http:
            return dict((await http.get("/pool/status")).json())


@asynccontextmanager
async def stack(*configs: SimulatorConfig, **pool: Any) -> AsyncIterator[Stack]:
    backends = [SimulatedBackend(config) for config in configs or (SimulatorConfig(models=("sim",)),)]
    async with started(backends, key=KEY, **pool) as up:
        yield Stack(up.url, backends)


def sim(*models: str, **settings: Any) -> SimulatorConfig:
    return SimulatorConfig(models=models or ("sim",), **{"tokens_per_second": 400.0, **settings})


# --- Anthropic Messages ----------------------------------------------------------------------


async def test_anthropic_messages_plain_and_streamed_with_usage_counted() -> None:
    async with stack() as s, s.anthropic() as client:
        reply = await client.messages.create(model="sim", max_tokens=4, messages=MESSAGES)
        async with client.messages.stream(model="sim", max_tokens=5, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        async with s.http() as http:
            metrics = (await http.get("/pool/metrics")).text
        status = await s.status()
    assert reply.content[0].type == "text"
    assert reply.content[0].text == "tok0 tok1 tok2 tok3 "
    assert reply.usage.output_tokens == 4
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert final.usage.output_tokens == 5
    assert 'lip_tokens_total{backend="b0",kind="completion",model="sim"} 9.0' in metrics
    assert 'lip_route_requests_total{outcome="ok",route="/messages"} 2.0' in metrics
    assert status["active_leases"] == 0


@asynccontextmanager
async def holding_the_only_slot(client: anthropic.AsyncAnthropic) -> AsyncIterator[None]:
    """A long stream on the backend's one slot, for as long as the block runs."""
    async with anyio.create_task_group() as group:
        streaming = anyio.Event()

        async def hold() -> None:
            async with client.messages.stream(model="sim", max_tokens=40, messages=MESSAGES) as stream:
                async for _ in stream.text_stream:
                    streaming.set()

        group.start_soon(hold)
        await streaming.wait()
        yield
        group.cancel_scope.cancel()


async def test_count_tokens_takes_no_slot() -> None:
    async with (
        stack(sim(slots=1, tokens_per_second=20)) as s,
        s.anthropic() as client,
        holding_the_only_slot(client),
    ):
        with anyio.fail_after(2):  # not queued behind the stream
            counted = await client.messages.count_tokens(model="sim", messages=MESSAGES)
        assert (await s.status())["active_leases"] == 1
    assert counted.input_tokens > 0


async def test_anthropic_errors_are_anthropic_shaped() -> None:
    async with stack() as s, s.anthropic() as client:
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await client.messages.create(model="nope", max_tokens=4, messages=MESSAGES)
        async with s.anthropic(key="sk-wrong") as stranger:
            with pytest.raises(anthropic.AuthenticationError):
                await stranger.messages.create(model="sim", max_tokens=4, messages=MESSAGES)
        async with s.http() as http:
            no_route = await http.post("/messages/nothing", json={})
            bad_body = await http.post("/messages", content=b"{not json")
    body = unknown.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]
    assert no_route.status_code == 404
    assert no_route.json()["error"]["type"] == "not_found_error"
    assert bad_body.status_code == 400
    assert bad_body.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "the request body is not valid JSON"},
    }


async def test_the_pool_overloaded_is_a_529_anthropic_clients_retry() -> None:
    async with (
        stack(sim(slots=1, tokens_per_second=20), queue_timeout=0.2) as s,
        s.anthropic() as client,
        holding_the_only_slot(client),
    ):
        with pytest.raises(anthropic.APIStatusError) as waited:
            await client.messages.create(model="sim", max_tokens=4, messages=MESSAGES)
    assert waited.value.status_code == 529
    assert isinstance(waited.value.body, dict)
    assert waited.value.body["error"]["type"] == "overloaded_error"
    assert waited.value.response.headers["retry-after"] == "1"


async def test_a_backend_dying_mid_stream_ends_an_anthropic_stream_with_an_error_event() -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].faults.die_after_tokens = 2
        body = {"model": "sim", "max_tokens": 8, "stream": True, "messages": MESSAGES}
        async with http.stream("POST", "/messages", json=body) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    last = raw.strip().split(b"\n\n")[-1].split(b"\n")
    assert last[0] == b"event: error"
    error = json.loads(last[1].removeprefix(b"data: "))
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"


# --- OpenAI Responses ------------------------------------------------------------------------


async def test_responses_plain_and_streamed_with_the_official_client() -> None:
    async with stack() as s, s.openai() as client:
        reply = await client.responses.create(model="sim", input="hello", max_output_tokens=3)
        stream = await client.responses.create(model="sim", input="hello", max_output_tokens=4, stream=True)
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        status = await s.status()
    assert reply.output_text == "tok0 tok1 tok2 "
    assert reply.usage is not None
    assert reply.usage.output_tokens == 3
    assert "".join(deltas) == "tok0 tok1 tok2 tok3 "
    assert status["active_leases"] == 0


async def test_previous_response_id_goes_to_the_backend_that_stores_it() -> None:
    stateful = sim(stateful_responses=True)
    async with stack(stateful, stateful) as s, s.openai() as client:
        first = await client.responses.with_raw_response.create(
            model="sim", input="hello", max_output_tokens=2
        )
        home = first.headers["x-backend"]
        previous = first.parse().id
        for _ in range(6):  # the other backend would answer 404: it never saw the response
            turn = await client.responses.with_raw_response.create(
                model="sim", input="again", max_output_tokens=2, previous_response_id=previous
            )
            assert turn.headers["x-backend"] == home
            previous = turn.parse().id
        stored = await client.responses.retrieve(previous)
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.retrieve("resp_never_made")
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="sim", input="x", previous_response_id="resp_never_made")
    assert stored.id == previous
    assert isinstance(unknown.value.body, dict)
    assert unknown.value.body["code"] == "response_not_found"


async def test_a_streamed_response_id_is_remembered_before_the_client_has_it() -> None:
    stateful = sim(stateful_responses=True)
    async with stack(stateful, stateful) as s, s.openai() as client:
        stream = await client.responses.create(model="sim", input="hello", max_output_tokens=2, stream=True)
        created = [event async for event in stream if event.type == "response.created"]
        follow_up = await client.responses.create(
            model="sim", input="again", max_output_tokens=2, previous_response_id=created[0].response.id
        )
    assert follow_up.status == "completed"


# --- llama.cpp's root routes, audio, and backends that lack a route ------------------------------


async def test_tokenize_without_a_model_goes_to_the_only_model_and_takes_no_slot() -> None:
    async with stack() as s, s.http() as http:
        tokens = await http.post("/tokenize", json={"content": "hello big world"})
        status = await s.status()
    assert tokens.json() == {"tokens": [5, 3, 5]}
    assert status["active_leases"] == 0
    assert status["stats"]["granted"] == 0


async def test_tokenize_without_a_model_on_a_pool_of_two_models_names_them() -> None:
    async with stack(sim("alpha"), sim("beta")) as s, s.http() as http:
        refused = await http.post("/tokenize", json={"content": "hello"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_model"
    assert "alpha, beta" in refused.json()["error"]["message"]


async def test_transcription_is_routed_by_its_form_field() -> None:
    async with stack(sim("whisper-a"), sim("whisper-b")) as s, s.openai() as client:
        heard = await client.audio.transcriptions.create(model="whisper-b", file=("a.wav", b"RIFF" * 1000))
        with pytest.raises(openai.NotFoundError):
            await client.audio.transcriptions.create(model="whisper-z", file=("a.wav", b"RIFF"))
    assert heard.text == "4000 bytes of audio heard by whisper-b"


async def test_a_backend_that_lacks_a_route_is_learned_and_routed_around() -> None:
    async with stack(sim(lacks=("/v1/messages",)), sim()) as s, s.anthropic() as client:
        served = []
        for _ in range(6):
            reply = await client.messages.with_raw_response.create(
                model="sim", max_tokens=2, messages=MESSAGES
            )
            served.append(reply.headers["x-backend"])
        status = await s.status()
    assert set(served) == {"b1"}
    assert status["backends"][0]["lacks_routes"] == ["/v1/messages"]
    assert status["backends"][1]["lacks_routes"] == []


async def test_when_no_backend_serves_a_route_the_answer_says_so_in_its_dialect() -> None:
    lacking = sim(lacks=("/v1/messages",))
    async with stack(lacking, lacking) as s, s.anthropic() as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="sim", max_tokens=2, messages=MESSAGES)
    assert isinstance(missing.value.body, dict)
    assert "no backend for model 'sim' serves POST /messages" in missing.value.body["error"]["message"]


async def test_a_404_that_names_the_model_is_the_backends_answer_not_a_missing_route() -> None:
    async with stack() as s, s.http() as http:
        s.backends[0].config = sim()  # the same; the request names a model the backend refuses
        answer = await http.post("/rerank", json={"model": "sim", "query": "q", "documents": ["a"]})
        status = await s.status()
    assert answer.status_code == 404  # the simulator has no /v1/rerank: "File Not Found" is a route
    assert status["backends"][0]["lacks_routes"] == ["/v1/rerank"]


@pytest.mark.parametrize("route", ["/messages", "/responses"])
async def test_a_client_leaving_a_stream_on_the_new_routes_frees_its_slot(route: str) -> None:
    async with stack(sim(tokens_per_second=20)) as s, s.http() as http:
        body: dict[str, Any] = {"model": "sim", "stream": True}
        body.update(
            {"max_tokens": 200, "messages": MESSAGES}
            if route == "/messages"
            else {"max_output_tokens": 200, "input": "hi"}
        )
        async with http.stream("POST", route, json=body) as response:
            async for _ in response.aiter_raw():
                break  # the first event, then gone
        with anyio.fail_after(5):
            while (await s.status())["active_leases"]:
                await anyio.sleep(0.02)
        with anyio.fail_after(5):
            while s.backends[0].stats.running:  # the backend stopped generating for it
                await anyio.sleep(0.02)
