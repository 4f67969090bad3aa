"""The pool under real uvicorn on 127.0.0.1, two simulated llama.cpp backends, the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import openai
import pytest

from local_inference_pool import BackendConfig
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    url: str
    backends: list[SimulatedBackend]

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="sk-pool", max_retries=0, timeout=20)

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await http.get(
                f"{self.url}/v1/pool/status", headers={"authorization": "Bearer sk-pool"}
            )
            return dict(response.json())


@asynccontextmanager
async def stack(slots: int = 2, tokens_per_second: float = 400.0, **pool: object) -> AsyncIterator[Stack]:
    backends = [
        SimulatedBackend(SimulatorConfig(models=("sim",), slots=slots, tokens_per_second=tokens_per_second))
        for _ in range(2)
    ]
    unnamed = lambda _index, url: BackendConfig(url=url)  # noqa: E731 - named by the pool, from the URL
    async with started(backends, backend=unnamed, key="sk-pool", **pool) as up:
        yield Stack(up.url, backends)


async def test_chat_with_the_official_client_and_slot_detection() -> None:
    async with stack() as s, s.client() as client:
        reply = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        models = await client.models.list()
        status = await s.status()
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4
    assert [m.id for m in models.data] == ["sim"]
    assert [b["slots"] for b in status["backends"]] == [2, 2]
    assert status["active_leases"] == 0


async def test_streaming_arrives_while_the_backend_is_still_generating() -> None:
    async with stack(tokens_per_second=40) as s, s.client() as client:
        stream = await client.chat.completions.create(
            model="sim",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: list[str] = []
        still_generating_at_first_token = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if still_generating_at_first_token is None:
                    still_generating_at_first_token = all(b.stats.completed == 0 for b in s.backends) and any(
                        b.stats.running == 1 for b in s.backends
                    )
                texts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        status = await s.status()
    assert still_generating_at_first_token is True  # relayed as produced, not buffered
    assert "".join(texts) == "".join(f"tok{i} " for i in range(10))
    assert usage.completion_tokens == 10
    assert status["active_leases"] == 0


async def test_many_more_clients_than_slots_all_complete_within_slots() -> None:
    async with stack(slots=2, tokens_per_second=1000) as s, s.client() as client:
        done: list[str] = []

        async def one(index: int) -> None:
            if index % 2:
                stream = await client.chat.completions.create(
                    model="sim",
                    messages=[{"role": "user", "content": f"q{index}"}],
                    max_tokens=5,
                    stream=True,
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": f"q{index}"}], max_tokens=5
                )
            done.append(str(index))

        async with anyio.create_task_group() as group:
            for index in range(40):
                group.start_soon(one, index)
        status = await s.status()
    assert len(done) == 40
    assert all(b.peak_running <= 2 for b in s.backends)
    assert sum(b.stats.completed for b in s.backends) == 40
    assert status["active_leases"] == 0
    assert status["queue"]["waiting"] == 0


async def test_client_leaving_mid_stream_stops_the_backend_generating() -> None:
    async with stack(tokens_per_second=20) as s:  # 200 tokens would take 10 s
        async with httpx.AsyncClient(base_url=s.url, trust_env=False, timeout=10) as http:
            body = {
                "model": "sim",
                "stream": True,
                "max_tokens": 200,
                "messages": [{"role": "user", "content": "long"}],
            }
            headers = {"authorization": "Bearer sk-pool"}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                seen = 0
                async for _line in response.aiter_lines():
                    seen += 1
                    if seen >= 6:
                        break  # leaving closes the connection
        with anyio.fail_after(3):
            while any(b.stats.running for b in s.backends) or (await s.status())["active_leases"]:
                await anyio.sleep(0.02)
    assert all(b.stats.completed == 0 for b in s.backends)  # it stopped, it did not finish
