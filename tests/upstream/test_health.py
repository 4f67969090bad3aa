from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from local_inference_pool import BackendConfig, Pool, PoolConfig
from local_inference_pool.core.scheduler import Backend, Health
from local_inference_pool.upstream.health import Monitor

from ..clock import Clock
from ..kinds import Server, Servers

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def monitored(
    servers: Servers, *backends: BackendConfig, clock: Clock | None = None, **pool: object
) -> AsyncIterator[tuple[Pool, Monitor]]:
    config = PoolConfig(backends=backends, **{"health_interval": 0.02, "health_timeout": 0.5, **pool})  # type: ignore[arg-type]
    instance = Pool(config, initial_health=Health.LOADING)
    async with servers.client() as client, anyio.create_task_group() as group:
        monitor = Monitor(instance, client, config, clock=clock or Clock())
        await group.start(monitor.run)
        yield instance, monitor
        group.cancel_scope.cancel()


def health(backend: Backend) -> Health:
    """Read through a call so the type checker does not narrow what the monitor changes."""
    return backend.health


async def until(check: object, timeout: float = 2.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def probed(server: Server, times: int = 3) -> None:
    """Until the monitor has probed ``server`` about ``times`` more times (a probe asks two to four
    paths): several polls have happened, which a fixed sleep would only hope for."""
    seen = len(server.paths)
    await until(lambda: len(server.paths) >= seen + 2 * times)


async def test_detects_once_and_shows_the_kind_and_health_in_the_snapshot() -> None:
    servers = Servers(a=Server("llamacpp", slots=3), b=Server("ollama", models=["q:latest"]))
    async with monitored(
        servers, BackendConfig(url="http://a:1"), BackendConfig(url="http://b:1", slots=2)
    ) as (pool, _):
        backends = pool.scheduler.backends
        await until(lambda: all(b.health is Health.HEALTHY for b in backends.values()))
        await probed(servers["a"])
        await probed(servers["b"])
        snapshot = {b["name"]: b for b in pool.snapshot()["backends"]}
    assert snapshot["a:1"]["detected_kind"] == "llamacpp"
    assert snapshot["b:1"]["detected_kind"] == "ollama"
    assert snapshot["a:1"]["slots"] == 3
    assert snapshot["b:1"]["models"] == ["q", "q:latest"]
    assert servers["a"].paths.count("/lmstudio-greeting") == 1  # detection ran once


async def test_a_hanging_backend_does_not_delay_the_others() -> None:
    servers = Servers(
        ok=Server("llamacpp"), hang=Server("llamacpp", hang=True), down=Server("llamacpp", down=True)
    )
    backends_config = [BackendConfig(url=f"http://{h}:1") for h in ("ok", "hang", "down")]
    async with monitored(servers, *backends_config, health_timeout=0.5) as (pool, _):
        backends = pool.scheduler.backends
        await until(
            lambda: (
                backends["ok:1"].health is Health.HEALTHY and backends["down:1"].health is Health.UNHEALTHY
            ),
            timeout=0.4,
        )
        await until(lambda: backends["hang:1"].health is Health.UNHEALTHY)


async def test_a_request_waiting_for_a_loading_backend_flows_when_it_is_ready() -> None:
    servers = Servers(boot=Server("llamacpp", loading=True))
    async with monitored(servers, BackendConfig(url="http://boot:1", models=("m",))) as (pool, _):
        got: list[str] = []

        async def request() -> None:
            async with pool.acquire("m") as lease:
                got.append(lease.backend)

        async with anyio.create_task_group() as group:
            group.start_soon(request)
            await until(lambda: pool.scheduler.waiting == 1)
            await probed(servers["boot"])  # still loading, still waiting
            assert got == []
            servers["boot"].loading = False
            await until(lambda: bool(got))
    assert got == ["boot:1"]


async def test_loaded_model_steers_placement() -> None:
    servers = Servers(
        one=Server("lmstudio", models=["a", "b"], loaded=["a"]),
        two=Server("lmstudio", models=["a", "b"], loaded=["b"]),
    )
    async with monitored(servers, BackendConfig(url="http://one:1"), BackendConfig(url="http://two:1")) as (
        pool,
        _,
    ):
        await until(lambda: all(b.residency_known for b in pool.scheduler.backends.values()))
        async with pool.acquire("b") as for_b, pool.acquire("a") as for_a:
            assert (for_b.backend, for_a.backend) == ("two:1", "one:1")
            assert not for_b.loaded_model


async def test_outside_work_on_llama_cpp_slots_takes_our_capacity() -> None:
    servers = Servers(a=Server("llamacpp", slots=2, busy=2))  # another client fills both slots
    async with monitored(servers, BackendConfig(url="http://a:1")) as (pool, _):
        backend = pool.scheduler.backends["a:1"]
        await until(lambda: backend.health is Health.HEALTHY and backend.external_busy == 2)
        got: list[str] = []

        async def request() -> None:
            async with pool.acquire("m") as lease:
                got.append(lease.backend)

        async with anyio.create_task_group() as group:
            group.start_soon(request)
            await probed(servers["a"])
            assert got == []  # no free slot while the outside work runs
            servers["a"].busy = 0
            await until(lambda: bool(got))


async def test_a_failed_probe_keeps_the_models_queued_requests_use() -> None:
    servers = Servers(a=Server("llamacpp", models=["m"]))
    async with monitored(servers, BackendConfig(url="http://a:1")) as (pool, _):
        backend = pool.scheduler.backends["a:1"]
        await until(lambda: backend.health is Health.HEALTHY)
        servers["a"].down = True
        await until(lambda: backend.health is Health.UNHEALTHY)
        assert backend.models == frozenset({"m"})


async def test_circuit_opens_after_failures_then_one_trial_decides() -> None:
    clock = Clock()
    servers = Servers(a=Server("llamacpp", slots=4))
    async with monitored(
        servers, BackendConfig(url="http://a:1"), clock=clock, circuit_failures=2, circuit_cooldown=10
    ) as (pool, monitor):
        backend = pool.scheduler.backends["a:1"]
        await until(lambda: backend.health is Health.HEALTHY and backend.slots == 4)
        monitor.failed("a:1", "answered 500")
        assert health(backend) is Health.HEALTHY  # one failure is not enough
        monitor.failed("a:1", "answered 500")
        assert health(backend) is Health.UNHEALTHY
        await probed(servers["a"])  # probes keep succeeding, the circuit keeps it out
        assert health(backend) is Health.UNHEALTHY
        clock.now += 10
        await until(lambda: backend.health is Health.HEALTHY)
        assert backend.trial
        assert backend.free == 1  # half-open: one trial request at a time
        monitor.failed("a:1", "answered 502")  # the trial fails: out again, for longer
        assert health(backend) is Health.UNHEALTHY
        clock.now += 10
        await probed(servers["a"])
        assert health(backend) is Health.UNHEALTHY  # the cooldown doubled to 20 s
        clock.now += 10
        await until(lambda: backend.trial)
        monitor.succeeded("a:1")
        assert health(backend) is Health.HEALTHY
        assert not backend.trial
        assert backend.free == 4
        assert pool.snapshot()["backends"][0]["circuit"] == "closed"
        assert pool.snapshot()["backends"][0]["circuit_openings"] == 2


async def test_an_answer_of_an_unexpected_shape_never_stops_the_monitor() -> None:
    servers = Servers(a=Server("llamacpp"))
    async with monitored(servers, BackendConfig(url="http://a:1", kind="llamacpp")) as (pool, _):
        backend = pool.scheduler.backends["a:1"]
        await until(lambda: backend.health is Health.HEALTHY)
        servers["a"].garbled = True
        await until(lambda: backend.health is Health.UNHEALTHY)
        servers["a"].garbled = False
        await until(lambda: backend.health is Health.HEALTHY)  # the loop is still alive


async def test_nothing_is_logged_per_poll_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="local_inference_pool")
    servers = Servers(a=Server("llamacpp"))
    async with monitored(servers, BackendConfig(url="http://a:1")) as (pool, _):
        await until(lambda: pool.scheduler.backends["a:1"].health is Health.HEALTHY)
        await probed(servers["a"], times=10)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= 20]
    assert lines == ["backend a:1 (http://a:1) detected as llamacpp", "backend a:1 is healthy"]
