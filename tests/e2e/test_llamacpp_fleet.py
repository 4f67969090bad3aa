"""A living fleet of real llama.cpp servers: one drained for maintenance while it streams, killed
and started again with no request failing, and one that joins by the ``register`` command."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running

from .test_llamacpp import Pair, llama_pair  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ADMIN = {"authorization": "Bearer admin-secret"}
STREAM = {
    "model": "gemma",
    "stream": True,
    "max_tokens": 48,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Count from one to thirty in words."}],
}


@asynccontextmanager
async def admin_pool(urls: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    config = PoolConfig(
        backends=tuple(BackendConfig(url=url, name=f"llama{i}") for i, url in enumerate(urls)),
        health_interval=0.3,
        admin_keys=("admin-secret",),
        drain_timeout=60,
    )
    async with (
        running(create_standalone_app(config)) as base,
        httpx.AsyncClient(base_url=f"{base}/v1", trust_env=False, timeout=120) as client,
    ):
        await until(client, lambda shown: all(b["health"] == "healthy" for b in shown.values()))
        yield client


async def backends(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in (await client.get("/pool/status")).json()["backends"]}


async def until(client: httpx.AsyncClient, check: Any, seconds: float = 60) -> None:
    with anyio.fail_after(seconds):
        while not check(await backends(client)):
            await anyio.sleep(0.1)


async def stream(client: httpx.AsyncClient, answers: list[tuple[str, int, str]]) -> None:
    async with client.stream("POST", "/chat/completions", json=STREAM) as response:
        text = (await response.aread()).decode()
    answers.append((response.headers.get("x-backend", ""), response.status_code, text))


@pytest.mark.timeout(300)
async def test_a_drained_server_finishes_its_streams_takes_no_new_one_and_restarts_unnoticed(
    llama_pair: Pair,  # noqa: F811
) -> None:
    answers: list[tuple[str, int, str]] = []
    async with admin_pool(llama_pair.urls) as client:
        async with anyio.create_task_group() as group:
            for _ in range(2):  # one slot each: one stream on each server
                group.start_soon(stream, client, answers)
            await until(client, lambda shown: all(b["active"] == 1 for b in shown.values()))
            drained = await client.post("/pool/admin/backends/llama0/drain", headers=ADMIN)
            assert drained.json()["admin_state"] == "draining"  # its stream still runs
            for _ in range(2):  # these go to llama1 alone, one after the other
                group.start_soon(stream, client, answers)
        await until(client, lambda shown: shown["llama0"]["admin_state"] == "drained")
        assert (await backends(client))["llama0"]["granted"] == 1

        os.killpg(llama_pair.servers[0].process.pid, signal.SIGKILL)  # maintenance
        llama_pair.servers[0].process.wait(timeout=15)
        async with anyio.create_task_group() as group:
            for _ in range(2):
                group.start_soon(stream, client, answers)
        await anyio.to_thread.run_sync(llama_pair.restart_killed)
        await client.post("/pool/admin/backends/llama0/undrain", headers=ADMIN)
        await until(client, lambda shown: shown["llama0"]["health"] == "healthy")
        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(stream, client, answers)
    assert [status for _, status, _ in answers] == [200] * 10
    assert all(text.rstrip().endswith("data: [DONE]") for _, _, text in answers)
    served = [backend for backend, _, _ in answers]
    assert served[:2].count("llama0") == 1  # the stream it had when drained finished there
    assert "llama0" not in served[2:6]  # nothing new while drained, killed and restarted
    assert "llama0" in served[6:]  # back in service


@pytest.mark.timeout(300)
async def test_register_brings_a_second_real_server_into_the_fleet(llama_pair: Pair) -> None:  # noqa: F811
    first, second = llama_pair.urls
    async with admin_pool([first]) as client:
        base = str(client.base_url).rstrip("/")
        command = [sys.executable, "-m", "local_inference_pool.cli", "register", "--pool", base]
        command += ["--admin-key-env", "E2E_ADMIN_KEY", "--url", second, "--name", "box2", "--ttl", "5"]
        env = {**os.environ, "E2E_ADMIN_KEY": "admin-secret"}
        async with await anyio.open_process(command, env=env) as registering:
            await until(client, lambda shown: shown.get("box2", {}).get("health") == "healthy")
            assert (await backends(client))["box2"]["slots"] == 1  # detected from the server
            answers: list[tuple[str, int, str]] = []
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(stream, client, answers)
            registering.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                assert await registering.wait() == 0
        assert "box2" not in await backends(client)
    assert [status for _, status, _ in answers] == [200] * 4
    assert {backend for backend, _, _ in answers} == {"llama0", "box2"}
