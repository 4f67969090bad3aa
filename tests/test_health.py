from __future__ import annotations

import anyio
import httpx
import pytest

from local_inference_pool import BackendConfig, Pool, PoolConfig
from local_inference_pool.health import poll_backends, probe_backend
from local_inference_pool.scheduler import Health

pytestmark = pytest.mark.anyio


def fleet(answers: dict[str, str]) -> httpx.AsyncClient:
    """Hosts answer as llama-server does when ``ready``, ``loading``, ``refusing`` or ``hanging``."""

    async def handle(request: httpx.Request) -> httpx.Response:
        state = answers[request.url.host]
        if state == "refusing":
            raise httpx.ConnectError("refused", request=request)
        if state == "hanging":
            await anyio.sleep_forever()
        if state == "loading":
            return httpx.Response(503, json={"error": {"message": "Loading model", "code": 503}})
        if request.url.path == "/props":
            return httpx.Response(200, json={"total_slots": 3})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(200, json={"status": "ok"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(
    ("state", "health", "slots", "models"),
    [("ready", Health.HEALTHY, 3, ["m"]), ("loading", Health.LOADING, None, None)],
)
async def test_probe_reads_health_slots_and_models(
    state: str, health: Health, slots: int | None, models: list[str] | None
) -> None:
    async with fleet({"a": state}) as client:
        probe = await probe_backend(client, BackendConfig(url="http://a:1"))
    assert (probe.health, probe.slots, probe.models) == (health, slots, models)


async def test_configured_slots_skip_detection() -> None:
    async with fleet({"a": "ready"}) as client:
        probe = await probe_backend(client, BackendConfig(url="http://a:1", slots=8))
    assert probe.slots is None


async def test_a_hanging_backend_does_not_delay_the_others() -> None:
    answers = {"ok": "ready", "hang": "hanging", "down": "refusing", "boot": "loading"}
    config = PoolConfig(
        backends=tuple(BackendConfig(url=f"http://{h}:1") for h in answers),
        health_interval=0.05,
        health_timeout=0.5,
    )
    pool = Pool(config, initial_health=Health.LOADING)
    backends = pool.scheduler.backends
    async with fleet(answers) as client, anyio.create_task_group() as group:
        await group.start(poll_backends, pool, client, config)
        with anyio.fail_after(0.4):  # well before the hanging probe times out
            while (
                backends["ok:1"].health is not Health.HEALTHY
                or backends["down:1"].health is not Health.UNHEALTHY
            ):
                await anyio.sleep(0.01)
        assert backends["ok:1"].slots == 3
        assert backends["boot:1"].health is Health.LOADING
        with anyio.fail_after(2):
            while backends["hang:1"].health is not Health.UNHEALTHY:
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()


async def test_a_request_waiting_for_a_loading_backend_flows_when_it_is_ready() -> None:
    answers = {"boot": "loading"}
    config = PoolConfig(backends=(BackendConfig(url="http://boot:1", models=("m",)),), health_interval=0.05)
    pool = Pool(config, initial_health=Health.LOADING)
    got: list[str] = []

    async def request() -> None:
        async with pool.acquire("m") as lease:
            got.append(lease.backend)

    async with fleet(answers) as client, anyio.create_task_group() as group:
        await group.start(poll_backends, pool, client, config)
        group.start_soon(request)
        with anyio.fail_after(2):
            while pool.scheduler.waiting < 1:
                await anyio.sleep(0.01)
        await anyio.sleep(0.15)  # several probes: still loading, still waiting
        assert got == []
        answers["boot"] = "ready"
        with anyio.fail_after(2):
            while not got:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    assert got == ["boot:1"]
