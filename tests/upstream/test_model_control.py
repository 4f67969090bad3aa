"""``upstream.model_control``: loads and unloads, against fakes that answer as BACKENDS.md records."""

from __future__ import annotations

import pytest

from local_inference_pool import BackendConfig
from local_inference_pool.upstream import model_control
from local_inference_pool.upstream.model_control import ModelControlError

from ..kinds import Server, Servers

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["router", "lmstudio", "ollama"])
async def test_a_load_then_an_unload_change_what_the_server_holds(kind: str) -> None:
    server = Server(kind, models=["m", "n"], load_polls=2)
    servers = Servers(s=server)
    backend = BackendConfig(url="http://s:1")
    adapter_kind = "llamacpp" if kind == "router" else kind
    async with servers.client() as client:
        await model_control.load(client, backend, adapter_kind, "m", keep=True)
        assert server.loaded == ["m"]  # a router's load returns once its list says loaded
        if kind != "lmstudio":  # LM Studio would load a second instance: never asked of it
            await model_control.load(client, backend, adapter_kind, "m")  # already loaded: done
        await model_control.unload(client, backend, adapter_kind, "m")
        assert server.loaded == []
    assert server.changes[0] == ("load", "m")
    assert server.changes[-1] == ("unload", "m")


async def test_ollama_keeps_a_model_the_pool_unloads_itself() -> None:
    server = Server("ollama", models=["q:7b"])
    async with Servers(s=server).client() as client:
        await model_control.load(client, BackendConfig(url="http://s:1"), "ollama", "q:7b", keep=True)
        await model_control.load(client, BackendConfig(url="http://s:1"), "ollama", "q:7b")
        await model_control.unload(client, BackendConfig(url="http://s:1"), "ollama", "q:7b")
    assert server.bodies == [
        {"model": "q:7b", "keep_alive": -1},
        {"model": "q:7b"},  # Ollama's own timer stands
        {"model": "q:7b", "keep_alive": 0},
    ]


async def test_a_router_load_that_fails_raises_with_the_exit_code() -> None:
    servers = Servers(s=Server("router", models=["m"], fail_loads=True))
    async with servers.client() as client:
        with pytest.raises(ModelControlError, match=r"failed to load 'm' \(exit code 1\)"):
            await model_control.load(client, BackendConfig(url="http://s:1"), "llamacpp", "m")


async def test_an_unknown_model_is_refused_with_what_the_server_said() -> None:
    servers = Servers(s=Server("router", models=["m"]))
    async with servers.client() as client:
        with pytest.raises(ModelControlError, match=r"404.*model is not found"):
            await model_control.load(client, BackendConfig(url="http://s:1"), "llamacpp", "zz")


async def test_a_kind_that_cannot_load_is_refused() -> None:
    async with Servers(s=Server("vllm")).client() as client:
        with pytest.raises(ModelControlError, match="does not load"):
            await model_control.load(client, BackendConfig(url="http://s:1"), "vllm", "m")
