"""The placement driver in a running app: preload, a load for waiting requests, idle unload, and
what status and metrics show, against servers that load on request (fakes answering as BACKENDS.md
records their kinds)."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager

from local_inference_pool import BackendConfig, PoolConfig
from local_inference_pool.gateway.app import create_pool_app
from local_inference_pool.model_config import ModelConfig

from ..kinds import Server, Servers
from ..redis_store import Store

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def placed(
    servers: Servers, *models: ModelConfig, state: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    config = PoolConfig(
        backends=tuple(BackendConfig(url=f"http://{name}:1", name=name, slots=1) for name in servers.servers),
        models=models,
        state=state,
        health_interval=0.05,
        queue_timeout=10,
    )
    app = create_pool_app(config, transport=servers.transport)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pool") as client:
            yield client


async def until(check: Callable[[], Any], seconds: float = 5.0) -> None:
    """Until ``check()`` (or what it returns, awaited) is true."""
    with anyio.fail_after(seconds):
        while not (await result if inspect.isawaitable(result := check()) else result):
            await anyio.sleep(0.01)


async def states(client: httpx.AsyncClient, model: str) -> dict[str, str]:
    entry = (await client.get("/pool/status")).json()["models"].get(model, {"servers": {}})
    return {name: server["state"] for name, server in entry["servers"].items()}


async def test_preload_demand_and_idle_unload_on_routers() -> None:
    r1 = Server("router", models=["m", "n"], load_polls=3)
    r2 = Server("router", models=["m", "n"], load_polls=3)
    servers = Servers(r1=r1, r2=r2)
    models = (ModelConfig("m", preload=("r1",), idle_unload=0.6), ModelConfig("n", idle_unload=0.6))
    async with placed(servers, *models) as client:
        await until(lambda: r1.loaded == ["m"])
        await until(lambda: r2.paths.count("/v1/models") > 2)
        assert r2.changes == []  # m is preloaded where named, not everywhere
        answer = await client.post("/chat/completions", json={"model": "n", "messages": []})
        assert answer.status_code == 200
        assert ("load", "n") in r1.changes + r2.changes  # loaded for the request, by the pool
        assert (await states(client, "n"))[answer.headers["x-backend"]] == "loaded"
        await until(lambda: not r1.loaded and not r2.loaded, seconds=10)  # both idle past the TTL
        metrics = (await client.get("/pool/metrics")).text
    assert r1.sent_cold == r2.sent_cold == []  # no request reached a server before its model loaded
    assert (
        'lip_model_changes_total{action="load",backend="r1",model="m",outcome="ok",reason="preload"} 1.0'
        in metrics
    )
    assert 'action="unload"' in metrics
    assert 'reason="idle"' in metrics


async def test_a_load_shows_loading_and_holds_requests_for_the_model_it_evicts() -> None:
    r1 = Server("router", models=["m", "n"], loaded=["m"], load_polls=40)
    servers = Servers(r1=r1)
    async with placed(servers, ModelConfig("n", idle_unload=30)) as client:
        await until(lambda: r1.paths.count("/v1/models") > 1)
        async with anyio.create_task_group() as group:
            group.start_soon(partial(client.post, "/chat/completions", json={"model": "n", "messages": []}))
            await until(lambda: ("load", "n") in r1.changes)
            await until(lambda: r1._loading.get("n", 0) > 0)
            seen = await states(client, "n")
            assert seen == {"r1": "loading"}
            assert (await states(client, "m")) == {"r1": "unloading"}  # one place: m makes room
            with anyio.move_on_after(0.2):  # m's request waits while n loads in its place
                await client.post("/chat/completions", json={"model": "m", "messages": []})
                pytest.fail("a request for the evicted model was answered during the load")
        assert r1.served[0] == "n"
    assert r1.sent_cold == []
    assert r1.changes[:2] == [("unload", "m"), ("load", "n")]


async def test_a_failed_load_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    r1 = Server("router", models=["m"], fail_loads=True)
    async with placed(Servers(r1=r1), ModelConfig("m", preload=("r1",))) as client:
        await until(lambda: ("load", "m") in r1.changes)
        await until(lambda: "could not load model m" in caplog.text)
        probes = r1.paths.count("/v1/models")
        await until(lambda: r1.paths.count("/v1/models") > probes + 20)  # a second or so later
        metrics = (await client.get("/pool/metrics")).text
    assert r1.changes == [("load", "m")]  # not tried again at once: after a pause
    assert 'outcome="failed",reason="preload"' in metrics
    assert "exit code 1" in caplog.text


async def test_processes_sharing_state_load_once_and_each_sees_the_result(store: Store) -> None:
    r1 = Server("router", models=["m", "n"], load_polls=10)
    servers = Servers(r1=r1)
    model = ModelConfig("m", preload=("r1",))
    async with (
        placed(servers, model, state=store.url) as first,
        placed(servers, model, state=store.url) as second,
    ):
        await until(lambda: r1.loaded == ["m"])
        for client in (first, second):
            with anyio.fail_after(5):
                while (await states(client, "m")) != {"r1": "loaded"}:
                    await anyio.sleep(0.02)
        metrics = [(await client.get("/pool/metrics")).text for client in (first, second)]
    assert r1.changes == [("load", "m")]  # one process loaded it; the other held back
    made = [
        'lip_model_changes_total{action="load",backend="r1",model="m",outcome="ok",reason="preload"} 1.0' in m
        for m in metrics
    ]
    assert sorted(made) == [False, True]


@pytest.mark.parametrize("kind", ["ollama", "lmstudio"])
async def test_ollama_and_lm_studio_are_placed_as_a_router_is(kind: str) -> None:
    server = Server(kind, models=["q"])
    async with placed(Servers(s=server), ModelConfig("q", preload=("s",), idle_unload=0.5)) as client:
        await until(lambda: server.loaded == ["q"])
        await until(lambda: not server.loaded, seconds=10)
        metrics = (await client.get("/pool/metrics")).text
    assert server.changes == [("load", "q"), ("unload", "q")]
    assert 'action="unload",backend="s",model="q",outcome="ok",reason="idle"' in metrics
    if kind == "ollama":  # the pool unloads it: Ollama is asked to keep it until then
        assert server.bodies[0] == {"model": "q", "keep_alive": -1}


async def test_a_store_that_goes_away_holds_placement_back_and_clears_other_processes_marks(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    r1 = Server("router", models=["m", "n"], load_polls=2)
    servers = Servers(r1=r1)
    caplog.set_level("DEBUG", logger="local_inference_pool.gateway.model_placer")
    async with placed(servers, ModelConfig("m", idle_unload=60), state=store.url) as client:
        await until(lambda: r1.paths.count("/v1/models") > 1)
        redis.Redis(port=store.port).set(
            "{lip}:load-lock:r1", json.dumps({"model": "n", "state": "loading", "token": "t"})
        )
        await until(lambda: client_sees(client, "n", "loading"))  # another process's load, marked
        store.stop()
        await until(lambda: "placement waits for the shared state store" in caplog.text)
        await until(lambda: client_sees(client, "n", "unloaded"))  # its mark does not outlive the store
    assert r1.changes == []


async def client_sees(client: httpx.AsyncClient, model: str, state: str) -> bool:
    return (await states(client, model)).get("r1") == state
