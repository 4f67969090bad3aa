"""One model on a real llama-server and on a simulated Ollama, under each server's own name
(``serve_as``): its requests share one queue and both servers serve them."""

from __future__ import annotations

import anyio
import httpx
import openai
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.model_config import ModelConfig

from .ollama_fake import OllamaFake
from .test_llamacpp import llama_servers  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


async def test_one_model_on_llama_cpp_and_ollama_shares_one_queue(llama_servers: list[str]) -> None:  # noqa: F811
    ollama = OllamaFake()
    served: list[tuple[str, str, str]] = []  # (backend, the model the answer names, its text)
    gemma = ModelConfig("gemma", serve_as=(("ollama", ollama.model),))
    async with running(ollama.app()) as ollama_url:
        config = PoolConfig(
            backends=(
                BackendConfig(url=llama_servers[0], name="llama"),
                BackendConfig(url=ollama_url, name="ollama", kind="ollama", slots=1),
            ),
            models=(gemma,),
            health_interval=0.3,
            public_status=True,
        )
        async with (
            running(create_standalone_app(config)) as base,
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as client,
        ):
            with anyio.fail_after(30):
                while len((await client.models.list()).data) < 1 or len(await _healthy(base)) < 2:
                    await anyio.sleep(0.1)

            async def ask() -> None:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
                )
                reply = raw.parse()
                served.append((raw.headers["x-backend"], reply.model, reply.choices[0].message.content or ""))

            async with anyio.create_task_group() as group:
                for _ in range(8):  # more than the three slots: they queue as one model
                    group.start_soon(ask)
            listed = [model.id for model in (await client.models.list()).data]
    assert {backend for backend, _, _ in served} == {"llama", "ollama"}  # both served the one queue
    assert {model for _, model, _ in served} == {"gemma"}  # each answer names the model asked
    assert all(text for _, _, text in served)
    assert set(ollama.asked) == {ollama.model}  # Ollama was asked under its own name
    assert listed == ["gemma"]  # one model to clients


async def _healthy(base: str) -> list[str]:
    async with httpx.AsyncClient(trust_env=False) as http:
        status = (await http.get(f"{base}/v1/pool/status")).json()
    return [backend["name"] for backend in status["backends"] if backend["health"] == "healthy"]
