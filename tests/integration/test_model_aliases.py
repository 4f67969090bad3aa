"""Aliases of ``[[models]]`` through the pool to a simulated llama-server that knows only ``sim``:
a cloud name is served by the local model and answered under the name asked, streamed or not, on
the OpenAI and Anthropic APIs; ``/v1/models`` lists the exact aliases; a key's ``models`` applies
to the model served, so an alias never reaches a model outside it."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from local_inference_pool.config import KeyConfig
from local_inference_pool.model_config import ModelConfig
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

MODELS = (
    ModelConfig("sim", ("gpt-4o", "claude-*", "gpt-5*"), params_set=(("max_tokens", 3),)),
    ModelConfig("qwen-big", ("si*",)),  # matches 'sim', which a backend serves: served as it is
)
KEYS = (
    KeyConfig(name="team", key="sk-team", models=("sim",)),
    KeyConfig(name="other", key="sk-other", models=("qwen*",)),
)


def sims() -> list[SimulatedBackend]:
    return [SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=2000))]


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "{" in line]


async def test_an_alias_is_served_by_its_model_and_answered_under_the_name_asked() -> None:
    async with (
        started(sims(), models=MODELS, keys=KEYS, public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        team = {"authorization": "Bearer sk-team"}
        chat = {"model": "gpt-5.1-codex", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        plain = await http.post("/chat/completions", json=chat, headers=team)
        streamed = await http.post("/chat/completions", json={**chat, "stream": True}, headers=team)
        anthropic = {
            "model": "claude-opus-4-1",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        }
        message = await http.post(
            "/messages", json={**anthropic, "stream": True}, headers={"x-api-key": "sk-team"}
        )
        listed = await http.get("/models", headers=team)
        metrics = (await http.get("/pool/metrics", headers=team)).text
        outside = await http.post(
            "/chat/completions", json=chat, headers={"authorization": "Bearer sk-other"}
        )
        own_name = await http.post("/chat/completions", json={**chat, "model": "sim"}, headers=team)
    assert plain.status_code == 200, plain.text
    assert plain.json()["model"] == "gpt-5.1-codex"
    assert plain.headers["x-served-model"] == "sim"
    assert streamed.status_code == 200
    chunks = _events(streamed.text)
    assert chunks
    assert {chunk["model"] for chunk in chunks} == {"gpt-5.1-codex"}
    assert streamed.headers["x-served-model"] == "sim"
    start = next(event for event in _events(message.text) if event["type"] == "message_start")
    assert start["message"]["model"] == "claude-opus-4-1"  # type: ignore[index]
    assert [entry["id"] for entry in listed.json()["data"]] == ["gpt-4o", "sim"]  # patterns are not names
    assert {entry["context_length"] for entry in listed.json()["data"]} == {4096}  # the server's n_ctx
    assert 'lip_alias_requests_total{alias="gpt-5*",model="sim"} 2.0' in metrics
    assert 'lip_alias_requests_total{alias="claude-*",model="sim"} 1.0' in metrics
    # The key of 'other' may use qwen* only: an alias of sim does not take it there.
    assert outside.status_code == 403
    assert outside.json()["error"]["code"] == "model_not_allowed"
    assert own_name.json()["model"] == "sim"
    assert "x-served-model" not in own_name.headers
    # The model's params: max_tokens set to 3 for every request of sim, whatever the client asked.
    assert plain.json()["usage"]["completion_tokens"] == 3
    assert own_name.json()["usage"]["completion_tokens"] == 3


async def test_without_models_an_unknown_name_is_still_unknown() -> None:
    async with (
        started(sims(), public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        chat = {"model": "gpt-4o", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        answer = await http.post("/chat/completions", json=chat)
    assert answer.status_code == 404


async def test_one_model_known_by_another_id_on_each_server_shares_one_queue_and_both_serve() -> None:
    backends = [
        SimulatedBackend(
            SimulatorConfig(models=("qwen2.5-7b-instruct-q4_k_m.gguf",), slots=1, tokens_per_second=400)
        ),
        SimulatedBackend(SimulatorConfig(models=("qwen2.5:7b",), slots=1, tokens_per_second=400)),
    ]
    qwen = ModelConfig(
        "qwen2.5-7b",
        ("gpt-*",),
        serve_as=(("b0", "qwen2.5-7b-instruct-q4_k_m.gguf"), ("llamacpp", "qwen2.5:7b")),  # by name, by kind
    )
    async with (
        started(backends, models=(qwen,), public_status=True) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        listed = [entry["id"] for entry in (await http.get("/models")).json()["data"]]

        async def ask(model: str, answers: list[tuple[str, httpx.Response]]) -> None:
            chat = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            answers.append((model, await http.post("/chat/completions", json={**chat, "stream": True})))

        answers: list[tuple[str, httpx.Response]] = []
        async with anyio.create_task_group() as group:
            for index in range(6):
                group.start_soon(ask, "qwen2.5-7b" if index % 2 else "gpt-4.1", answers)
        status = (await http.get("/pool/status")).json()
    assert listed == ["qwen2.5-7b"]  # the servers' own ids are not names clients see
    assert {backend["name"]: backend["models"] for backend in status["backends"]} == {
        "b0": ["qwen2.5-7b"],
        "b1": ["qwen2.5-7b"],
    }
    loaded = {"state": "loaded", "health": "healthy"}
    assert status["models"] == {"qwen2.5-7b": {"servers": {"b0": loaded, "b1": loaded}, "replicas": 2}}
    assert len(answers) == 6
    for model, answer in answers:  # each named as asked, not by the server's own id
        assert answer.status_code == 200
        assert {chunk["model"] for chunk in _events(answer.text)} == {model}
    assert {answer.headers["x-backend"] for _, answer in answers} == {"b0", "b1"}  # one queue, both served
    assert all(backend.stats.completed >= 1 for backend in backends)
