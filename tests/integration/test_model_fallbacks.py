"""Fallbacks of ``[[models]]`` through the pool to simulated llama-servers: the primary's server
stopped, or a prompt longer than its context, and the fallback answers, visibly; a key's models
are never left for a fallback."""

from __future__ import annotations

import anyio
import httpx
import pytest

from local_inference_pool.config import KeyConfig
from local_inference_pool.model_config import ModelConfig
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

MODELS = (ModelConfig("big", fallbacks=("small",)),)
KEYS = (
    KeyConfig(name="any", key="sk-any"),
    KeyConfig(name="big-only", key="sk-big", models=("big",)),
)


def backends(big_context: int = 4096) -> list[SimulatedBackend]:
    return [
        SimulatedBackend(
            SimulatorConfig(models=("big",), slots=2, tokens_per_second=2000, n_ctx=big_context)
        ),
        SimulatedBackend(SimulatorConfig(models=("small",), slots=2, tokens_per_second=2000)),
    ]


def chat(words: str = "hi") -> dict[str, object]:
    return {"model": "big", "max_tokens": 4, "messages": [{"role": "user", "content": words}]}


async def test_the_primarys_server_stopped_the_fallback_answers() -> None:
    async with (
        started(backends(), models=MODELS, keys=KEYS, public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        any_key, big_only = {"authorization": "Bearer sk-any"}, {"authorization": "Bearer sk-big"}
        served = await http.post("/chat/completions", json=chat(), headers=any_key)
        await up.servers[0].stop()
        with anyio.fail_after(10):
            while (await http.get("/pool/status")).json()["backends"][0]["health"] == "healthy":
                await anyio.sleep(0.05)
        fallen = await http.post("/chat/completions", json=chat(), headers=any_key)
        kept = await http.post("/chat/completions", json=chat(), headers=big_only)
        metrics = (await http.get("/pool/metrics", headers=any_key)).text
    assert served.headers["x-backend"] == "b0"
    assert "x-fallback-from" not in served.headers
    assert fallen.status_code == 200, fallen.text
    assert fallen.headers["x-backend"] == "b1"
    assert fallen.headers["x-served-model"] == "small"
    assert fallen.headers["x-fallback-from"] == "big; unhealthy"
    assert fallen.json()["model"] == "big"  # named as asked
    assert 'lip_fallbacks_total{fallback="small",model="big",reason="unhealthy"} 1.0' in metrics
    # A key that may use big only is not sent to small: big's own answer (no healthy server).
    assert kept.status_code == 503
    assert "x-fallback-from" not in kept.headers


async def test_a_prompt_longer_than_the_primarys_context_goes_to_the_fallback() -> None:
    async with (
        started(backends(big_context=64), models=MODELS, keys=KEYS, public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        headers = {"authorization": "Bearer sk-any"}
        short = await http.post("/chat/completions", json=chat(), headers=headers)
        long = await http.post("/chat/completions", json=chat("word " * 200), headers=headers)
    assert short.headers["x-backend"] == "b0"
    assert long.status_code == 200
    assert long.headers["x-backend"] == "b1"
    assert long.headers["x-fallback-from"] == "big; context"
