from __future__ import annotations

import pytest

from local_inference_pool import BackendConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.upstream.backends import detect, probe
from local_inference_pool.upstream.backends.base import with_latest_alias

from ..kinds import Server, Servers

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("server", "kind"),
    [
        (Server("llamacpp"), "llamacpp"),
        (Server("router"), "llamacpp"),
        (Server("lmstudio"), "lmstudio"),
        (Server("ollama"), "ollama"),
        (Server("vllm"), "vllm"),
        (Server("openai"), "openai"),
    ],
)
async def test_detects_each_kind(server: Server, kind: str) -> None:
    async with Servers(h=server).client() as client:
        assert await detect(client, BackendConfig(url="http://h:1")) == kind


async def test_older_llama_cpp_loading_answer_is_understood() -> None:
    import httpx

    from local_inference_pool.upstream.backends.llamacpp import is_loading

    assert is_loading(httpx.Response(503, json={"status": "loading model"}))
    assert not is_loading(httpx.Response(503))  # vLLM's dead engine: empty body


async def test_a_loading_llama_cpp_is_detected_as_llama_cpp() -> None:
    async with Servers(h=Server("llamacpp", loading=True)).client() as client:
        assert await detect(client, BackendConfig(url="http://h:1")) == "llamacpp"


async def test_lm_studio_answering_200_everywhere_is_not_taken_for_llama_cpp() -> None:
    server = Server("lmstudio")
    async with Servers(h=server).client() as client:
        assert await detect(client, BackendConfig(url="http://h:1")) == "lmstudio"
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "lmstudio")
    assert snapshot.health is Health.HEALTHY
    assert "/props" not in server.paths  # the greeting decided before anything else was asked


async def test_llama_cpp_single_model_slots_busy_and_loading() -> None:
    server = Server("llamacpp", models=["qwen"], slots=4, busy=3)
    async with Servers(h=server).client() as client:
        ready = await probe(client, BackendConfig(url="http://h:1"), "llamacpp")
        server.loading = True
        loading = await probe(client, BackendConfig(url="http://h:1"), "llamacpp")
    assert (ready.health, ready.models, ready.resident, ready.slots, ready.busy) == (
        Health.HEALTHY,
        ["qwen"],
        ["qwen"],
        4,
        3,
    )
    assert loading.health is Health.LOADING
    assert ready.model_info == {"qwen": {"context_length": 4096, "vision": False}}


async def test_llama_cpp_router_reports_which_models_are_loaded() -> None:
    server = Server("router", models=["a", "b", "c"], loaded=["b"])
    async with Servers(h=server).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "llamacpp")
    assert (snapshot.models, snapshot.resident, snapshot.slots) == (["a", "b", "c"], ["b"], None)
    assert snapshot.model_info == {
        "a": {"state": "unloaded"},
        "b": {"state": "loaded"},
        "c": {"state": "unloaded"},
    }


async def test_lm_studio_lists_downloaded_and_loaded_models_and_parallel_slots() -> None:
    server = Server("lmstudio", models=["a", "b"], loaded=["b"], slots=6)
    async with Servers(h=server).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "lmstudio")
    assert (snapshot.models, snapshot.resident, snapshot.slots) == (["a", "b"], ["b"], 6)


async def test_lm_studio_says_each_models_context_tools_and_type() -> None:
    server = Server("lmstudio", models=["qwen", "qwen2-vl", "nomic-embed"], loaded=["qwen"])
    async with Servers(h=server).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "lmstudio")
    assert snapshot.model_info == {
        "qwen": {"context_length": 8192, "tools": True, "vision": False, "embeddings": False},  # as loaded
        "qwen2-vl": {"context_length": 32768, "tools": True, "vision": True, "embeddings": False},
        "nomic-embed": {"context_length": 32768, "tools": False, "vision": False, "embeddings": True},
    }


async def test_ollama_tags_and_loaded_models_with_latest_aliases() -> None:
    server = Server("ollama", models=["llama3.2:latest", "qwen:7b"], loaded=["qwen:7b"])
    async with Servers(h=server).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "ollama")
    assert snapshot.models == ["llama3.2:latest", "llama3.2", "qwen:7b"]
    assert snapshot.resident == ["qwen:7b"]
    assert snapshot.slots is None  # Ollama's parallelism is not exposed: configure it
    assert snapshot.model_info == {
        "llama3.2:latest": {"tools": True, "vision": False, "embeddings": False},
        "llama3.2": {"tools": True, "vision": False, "embeddings": False},
        "qwen:7b": {"tools": True, "vision": False, "embeddings": False, "context_length": 4096},
    }


async def test_vllm_reads_its_own_load_from_metrics() -> None:
    server = Server("vllm", models=["Qwen/Qwen3-8B"], busy=7)
    async with Servers(h=server).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "vllm")
    assert (snapshot.models, snapshot.resident, snapshot.busy) == (["Qwen/Qwen3-8B"], ["Qwen/Qwen3-8B"], 7)
    assert snapshot.model_info == {"Qwen/Qwen3-8B": {"context_length": 32768}}


async def test_generic_openai_server_says_only_models() -> None:
    async with Servers(h=Server("openai", models=["x"])).client() as client:
        snapshot = await probe(client, BackendConfig(url="http://h:1"), "openai")
    assert (snapshot.health, snapshot.models, snapshot.resident) == (Health.HEALTHY, ["x"], None)


def test_latest_alias() -> None:
    assert with_latest_alias(["a:latest", "b:1b", "a"]) == ["a:latest", "a", "b:1b"]
