"""Fault injection over real sockets: simulated backends and the pool under uvicorn on 127.0.0.1.

After every fault the client sees a clear answer, and /pool/status returns to zero leases and an
empty queue: nothing lost, nothing leaked.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import Served, running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .. import loopback
from .stack import started

pytestmark = pytest.mark.anyio

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Fleet:
    client: httpx.AsyncClient
    sims: list[SimulatedBackend]
    servers: list[Served]

    async def status(self) -> dict[str, Any]:
        return dict((await self.client.get("/pool/status")).json())

    async def backend(self, name: str) -> dict[str, Any]:
        return next(b for b in (await self.status())["backends"] if b["name"] == name)

    async def stop(self, index: int) -> None:
        """The backend's process goes away: its port refuses connections from now on."""
        await self.servers[index].stop()

    async def quiet(self) -> None:
        """Nothing lost, nothing leaked: no lease held, nothing queued."""
        with anyio.fail_after(5):
            while True:
                state = await self.status()
                if state["active_leases"] == 0 and state["queue"]["waiting"] == 0:
                    return
                await anyio.sleep(0.02)


@asynccontextmanager
async def fleet(*configs: SimulatorConfig, **pool: Any) -> AsyncIterator[Fleet]:
    sims = [SimulatedBackend(c) for c in configs]
    named = lambda index, url: BackendConfig(url=url, name=f"sim{index}")  # noqa: E731
    settings = {"health_interval": 0.2, "public_status": True, **pool}
    async with (
        started(sims, backend=named, **settings) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=30) as client,
    ):
        yield Fleet(client, sims, up.servers)


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    await client.post("/chat/completions", json=body)


def sim(**kwargs: Any) -> SimulatorConfig:
    return SimulatorConfig(**{"models": ("sim",), "slots": 2, "tokens_per_second": 500, **kwargs})


async def test_refused_connection_is_retried_on_another_backend() -> None:
    async with fleet(sim(), sim(), health_interval=60) as f:  # no probe will notice in time
        await f.stop(0)
        replies = [
            await f.client.post("/chat/completions", json=CHAT, headers={"x-session-id": "s"})
            for _ in range(3)
        ]
        assert [r.status_code for r in replies] == [200, 200, 200]
        assert {r.headers["x-backend"] for r in replies} == {"sim1"}
        assert (await f.backend("sim0"))["health"] == "unhealthy"
        await f.quiet()


async def test_backend_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async with fleet(sim()) as f:
        f.sims[0].faults.die_after_tokens = 3
        body = {**CHAT, "stream": True, "max_tokens": 50}
        async with f.client.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        error = json.loads(events[-1][len("data: ") :])["error"]
        assert error["code"] == "upstream_failed"
        assert "sim0" in error["message"]
        assert sum('"content":"tok' in e for e in events) == 3
        backend = await f.backend("sim0")
        assert backend["consecutive_failures"] == 1
        assert "mid-response" in backend["last_error"]
        await f.quiet()


async def test_backend_hanging_before_headers_is_504_at_the_deadline() -> None:
    async with fleet(sim(), read_timeout=1.0) as f:
        f.sims[0].faults.hang = True
        started = anyio.current_time()
        response = await f.client.post("/chat/completions", json=CHAT)
        elapsed = anyio.current_time() - started
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert 0.9 <= elapsed < 5
        assert (await f.backend("sim0"))["health"] == "healthy"  # a slow answer is not a dead backend
        await f.quiet()


@pytest.mark.parametrize(("status", "counted"), [(500, 0), (503, 1)])
async def test_backend_errors_pass_through_and_gateway_ones_count_against_it(
    status: int, counted: int
) -> None:
    async with fleet(sim()) as f:
        f.sims[0].faults.status = status
        response = await f.client.post("/chat/completions", json=CHAT)
        assert response.status_code == status
        assert response.json()["error"]["message"] == f"simulated failure {status}"
        assert (await f.backend("sim0"))["consecutive_failures"] == counted
        await f.quiet()


async def test_client_leaving_while_queued_never_reaches_the_backend() -> None:
    async with fleet(sim(slots=1, tokens_per_second=20)) as f:
        async with anyio.create_task_group() as group:
            group.start_soon(post, f.client, {**CHAT, "max_tokens": 20})
            with anyio.fail_after(5):
                while (await f.status())["active_leases"] < 1:
                    await anyio.sleep(0.01)
            async with anyio.create_task_group() as leaving:
                leaving.start_soon(post, f.client, CHAT)
                with anyio.fail_after(5):
                    while (await f.status())["queue"]["waiting"] < 1:
                        await anyio.sleep(0.01)
                leaving.cancel_scope.cancel()  # the client goes away while still waiting for a slot
            with anyio.fail_after(5):
                while (await f.status())["queue"]["waiting"]:
                    await anyio.sleep(0.01)
        await f.quiet()
        assert f.sims[0].stats.requests == 1  # the queued one never reached the backend


async def test_a_client_leaving_while_its_plain_answer_is_generated_stops_the_backend() -> None:
    async with fleet(sim(slots=1, tokens_per_second=100)) as f:
        async with anyio.create_task_group() as group:
            group.start_soon(post, f.client, {**CHAT, "max_tokens": 2000})  # 20 s of generation
            with anyio.fail_after(5):
                while not f.sims[0].stats.running:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()  # the client goes away before any answer
        with anyio.fail_after(5):
            while f.sims[0].stats.running:
                await anyio.sleep(0.01)
        await f.quiet()
        assert f.sims[0].stats.abandoned == 1
        assert f.sims[0].stats.completed == 0


async def test_a_client_that_stops_reading_gives_its_slot_back() -> None:
    # Big chunks fill the sockets quickly; the backend would go on for 20 s.
    async with fleet(sim(chunk_padding=32_000, tokens_per_second=100), send_timeout=1.0) as f:
        body = {**CHAT, "stream": True, "max_tokens": 2000}
        async with f.client.stream("POST", "/chat/completions", json=body) as response:
            async for _ in response.aiter_bytes():
                break  # read one chunk, then stop reading without closing
            with anyio.fail_after(10):
                while (await f.status())["active_leases"] or f.sims[0].stats.running:
                    await anyio.sleep(0.05)
        await f.quiet()
        assert f.sims[0].stats.completed == 0  # it was stopped, it did not finish


async def test_all_backends_down_is_503_at_once_not_at_the_deadline() -> None:
    async with fleet(sim(), sim(), queue_timeout=60) as f:
        await f.stop(0)
        await f.stop(1)
        with anyio.fail_after(5):
            while any(b["health"] != "unhealthy" for b in (await f.status())["backends"]):
                await anyio.sleep(0.05)
        started = anyio.current_time()
        response = await f.client.post("/chat/completions", json=CHAT)
        assert anyio.current_time() - started < 1
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_backend_available"
        assert int(response.headers["retry-after"]) >= 1
        await f.quiet()


async def test_a_backend_that_comes_back_serves_the_requests_waiting_for_it() -> None:
    async with fleet(sim()) as f:
        f.sims[0].restart()  # answers 503 "Loading model" on every path for a while
        object.__setattr__(f.sims[0].config, "startup_seconds", 1.0)
        with anyio.fail_after(5):
            while (await f.backend("sim0"))["health"] != "loading":
                await anyio.sleep(0.02)
        started = anyio.current_time()
        response = await f.client.post("/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert anyio.current_time() - started >= 0.3  # it waited for the load, then flowed
        await f.quiet()


async def test_a_request_that_breaks_backends_is_sent_twice_at_most_and_takes_no_one_down() -> None:
    poison = {"model": "m", "messages": [{"role": "user", "content": "poison"}]}

    def backend(request: loopback.Request) -> loopback.Reply:
        if request.path == "/v1/models":
            return loopback.Reply(200, {"object": "list", "data": [{"id": "m"}]})
        if request.headers.get("x-request-id", "").startswith("poison"):
            return loopback.Reply(0, hang_up=True)  # read it, then died without an answer
        return loopback.Reply(200, {"object": "chat.completion", "choices": []})

    async with AsyncExitStack() as stack:
        backends = [await stack.enter_async_context(loopback.serve(backend)) for _ in range(3)]
        config = PoolConfig(
            backends=tuple(
                BackendConfig(url=b.url, name=f"b{i}", kind="openai", slots=2) for i, b in enumerate(backends)
            ),
            health_interval=0.2,
            public_status=True,
            circuit_failures=3,
        )
        base = await stack.enter_async_context(running(create_standalone_app(config)))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=f"{base}/v1", trust_env=False))
        f = Fleet(client, [], [])
        with anyio.fail_after(5):
            while any(b["health"] != "healthy" for b in (await f.status())["backends"]):
                await anyio.sleep(0.02)
        response = await client.post("/chat/completions", json=poison, headers={"x-request-id": "poison-1"})
        sent = [sum(r.path == "/v1/chat/completions" for r in b.requests) for b in backends]
        after = await client.post("/chat/completions", json=poison | {"messages": []})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_no_answer"
        assert sorted(sent) == [0, 1, 1]  # once on one backend, once more on another, never a third
        assert after.status_code == 200  # the next request is not locked out of the fleet
        assert all(b["health"] == "healthy" for b in (await f.status())["backends"])
        await f.quiet()
