"""The v0.7 API, exercised the way its README and consumer guide use it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
import anyio.lowlevel
import pytest

from local_inference_pool import (
    ConcurrentDispatcher,
    DispatcherTimeoutError,
    ModelNotAvailableError,
    NoModelsAvailableError,
    PoolConfig,
    ServerConfig,
    ServerPool,
)

from .loopback import Reply, Request, serve

S0 = "http://server0:1234"
S1 = "http://server1:1234"


@pytest.fixture
def pool() -> ServerPool:
    pool = ServerPool([S0, S1])
    pool.servers[S0].available_models = ["modelA", "shared"]
    pool.servers[S1].available_models = ["modelB", "shared"]
    return pool


async def queued(pool: ServerPool, count: int) -> None:
    with anyio.fail_after(2):
        while pool.pool.scheduler.waiting < count:
            await anyio.lowlevel.checkpoint()


def test_the_seeds_documented_import_paths_still_work() -> None:
    """The seed documents its top-level names and two modules, ``dispatcher`` and ``exceptions``."""
    import local_inference_pool
    from local_inference_pool.dispatcher import ConcurrentDispatcher as OldDispatcher
    from local_inference_pool.dispatcher import InferenceTask
    from local_inference_pool.exceptions import DispatcherTimeoutError as OldTimeout

    assert local_inference_pool.ServerConfig is ServerConfig
    assert local_inference_pool.ServerPool is ServerPool
    assert OldDispatcher is ConcurrentDispatcher
    assert OldTimeout is DispatcherTimeoutError
    assert InferenceTask.__name__ == "InferenceTask"
    assert issubclass(NoModelsAvailableError, RuntimeError)
    assert issubclass(ModelNotAvailableError, ValueError)
    assert issubclass(DispatcherTimeoutError, TimeoutError)


def test_server_config_defaults_and_is_busy() -> None:
    config = ServerConfig(url="http://gpu0:1234")
    assert config.available_models == []
    assert (config.active_requests, config.max_concurrent, config.current_model) == (0, 1, None)
    assert config.last_refresh_error is None
    assert not config.is_busy
    config.active_requests = 1
    assert config.is_busy


# --- find_and_acquire / release_server -------------------------------------------------------


def test_acquire_routes_by_model_and_counts(pool: ServerPool) -> None:
    url = pool.find_and_acquire("modelA")
    assert url == S0
    assert pool.servers[S0].active_requests == 1
    assert pool.servers[S0].current_model == "modelA"
    assert pool.find_and_acquire("modelC") is None
    pool.release_server(url)
    assert pool.servers[S0].active_requests == 0
    assert pool.servers[S0].current_model is None


def test_least_loaded_server_first(pool: ServerPool) -> None:
    pool.set_max_concurrent(4)
    assert pool.find_and_acquire("shared") == S0
    assert pool.find_and_acquire("shared") == S1


def test_drain_guard_then_other_model_after_drain() -> None:
    pool = ServerPool([S0])
    pool.servers[S0].available_models = ["modelA", "modelB"]
    pool.servers[S0].max_concurrent = 4
    url = pool.find_and_acquire("modelA")
    assert pool.find_and_acquire("modelB") is None
    assert pool.find_and_acquire("modelA") == S0
    pool.release_server(S0)
    pool.release_server(S0)
    assert url == S0
    assert pool.find_and_acquire("modelB") == S0
    assert pool.servers[S0].current_model == "modelB"


@pytest.mark.anyio
async def test_release_server_releases_the_callers_own_slot(pool: ServerPool) -> None:
    """Two requests on one server: the one that took its slot last releases first, and its own
    lease ends, not the older one (a URL alone cannot say whose slot it is; the task can)."""
    pool.set_max_concurrent(2)
    dispatcher = ConcurrentDispatcher(pool)
    leases: dict[str, object] = {}
    mine = asyncio.Event()

    async def request(name: str, wait_for: asyncio.Event | None) -> None:
        url = await dispatcher.submit("modelA")
        leases[name] = pool._held[url][-1][1]
        if wait_for is not None:
            await wait_for.wait()
        pool.release_server(url)

    first = asyncio.ensure_future(request("first", mine))  # takes its slot first, finishes last
    await asyncio.sleep(0)
    second = asyncio.ensure_future(request("second", None))
    await second
    assert leases["second"].released  # type: ignore[attr-defined]
    assert not leases["first"].released  # type: ignore[attr-defined]
    mine.set()
    await first
    assert leases["first"].released  # type: ignore[attr-defined]


def test_extra_release_is_ignored_not_negative(pool: ServerPool, caplog: pytest.LogCaptureFixture) -> None:
    url = pool.find_and_acquire("modelA")
    assert url is not None
    pool.release_server(url)
    with caplog.at_level(logging.WARNING):
        pool.release_server(url)
    assert pool.servers[S0].active_requests == 0
    assert "no slot is held" in caplog.text


def test_set_max_concurrent_has_a_floor_of_one(pool: ServerPool) -> None:
    pool.set_max_concurrent(0)
    assert all(server.max_concurrent == 1 for server in pool.servers.values())
    pool.set_max_concurrent(3)
    assert pool.pool.scheduler.backends["server0:1234"].slots == 3


def test_in_place_model_edit_takes_effect(pool: ServerPool) -> None:
    pool.servers[S1].available_models.append("modelC")
    assert pool.find_and_acquire("modelC") == S1
    assert "modelC" in pool.get_all_available_models()


def test_server_configs_with_keys_and_url_spellings() -> None:
    pool = ServerPool([ServerConfig(url=S0, api_key="key-a", available_models=["m"], max_concurrent=2)])
    assert pool.find_and_acquire("m") == S0
    pool.release_server(S0 + "/v1/")  # another spelling of the same server
    assert pool.servers[S0].active_requests == 0
    assert pool.get_server_url_by_index(0) == S0
    assert pool.get_server_url_by_index(1) is None


# --- dispatcher ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_documented_consumer_pattern(pool: ServerPool) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    calls: list[str] = []

    async def work(model: str) -> None:
        url = await dispatcher.submit(model)
        try:
            calls.append(url)
            await anyio.sleep(0.001)
        finally:
            pool.release_server(url)

    async with anyio.create_task_group() as tg:
        for model in ["modelA", "modelB", "shared", "modelA", "shared", "modelB"] * 3:
            tg.start_soon(work, model)
    assert len(calls) == 18
    assert all(server.active_requests == 0 for server in pool.servers.values())


@pytest.mark.anyio
async def test_submit_fans_out_and_waits_for_a_release(pool: ServerPool) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    urls = await asyncio.gather(dispatcher.submit("shared"), dispatcher.submit("shared"))
    assert set(urls) == {S0, S1}
    waiting = asyncio.ensure_future(dispatcher.submit("modelA"))
    await queued(pool, 1)
    assert len(dispatcher.pending) == 1
    pool.release_server(S0)
    assert await waiting == S0
    assert dispatcher.pending == set()


@pytest.mark.anyio
@pytest.mark.parametrize("steps", [0, 1])
async def test_a_submit_cancelled_before_its_caller_has_the_url_holds_no_slot(
    pool: ServerPool, steps: int
) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    task = asyncio.create_task(dispatcher.submit("modelA"))
    for _ in range(steps):  # v0.7's own tests: schedule, let it run a step, cancel
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert pool.servers[S0].active_requests == 0
    assert pool.pool.scheduler.grants == {}
    assert await dispatcher.submit("modelA") == S0  # the slot is free for the next caller


@pytest.mark.anyio
async def test_fail_fast_messages_carry_server_errors() -> None:
    empty = ServerPool([S0, S1])
    empty.servers[S0].last_refresh_error = "HTTP 401"
    empty.servers[S1].last_refresh_error = "Connection refused"
    with pytest.raises(NoModelsAvailableError, match="HTTP 401"):
        await ConcurrentDispatcher(empty).submit("modelA")
    partial = ServerPool([S0, S1])
    partial.servers[S0].available_models = ["other"]
    partial.servers[S1].last_refresh_error = "HTTP 401"
    with pytest.raises(ModelNotAvailableError, match="HTTP 401"):
        await ConcurrentDispatcher(partial).submit("qwen3.5-9b")


@pytest.mark.anyio
async def test_timeout_keeps_the_held_slot_and_none_waits(pool: ServerPool) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    url = await dispatcher.submit("modelA")
    with pytest.raises(DispatcherTimeoutError, match=r"'modelA' \(0.05s\)"):
        await dispatcher.submit("modelA", timeout=0.05)
    assert pool.servers[url].active_requests == 1

    async def release_later() -> None:
        await anyio.sleep(0.05)
        pool.release_server(url)

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_later)
        assert await dispatcher.submit("modelA", timeout=None) == S0
    pool.release_server(S0)
    assert pool.servers[S0].active_requests == 0


@pytest.mark.anyio
async def test_cancellation_at_any_moment_never_leaks(pool: ServerPool) -> None:
    pool.servers[S0].max_concurrent = 4
    dispatcher = ConcurrentDispatcher(pool)
    for delay in (0, 0, 1e-4, 1e-3):
        task = asyncio.ensure_future(dispatcher.submit("modelA"))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            pool.release_server(await task)
    assert pool.servers[S0].active_requests == 0


@pytest.mark.anyio
async def test_second_model_is_not_starved() -> None:
    pool = ServerPool([S0], config=PoolConfig(starvation_bound=0.05))
    pool.servers[S0].available_models = ["modelA", "modelB"]
    pool.servers[S0].max_concurrent = 2
    dispatcher = ConcurrentDispatcher(pool)
    stop = anyio.Event()
    served_b: list[str] = []

    async def keep_model_a_busy() -> None:
        while not stop.is_set():
            url = await dispatcher.submit("modelA", timeout=5)
            try:
                await anyio.sleep(0.005)
            finally:
                pool.release_server(url)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(keep_model_a_busy)
        await anyio.sleep(0.02)
        url = await dispatcher.submit("modelB", timeout=5)
        served_b.append(url)
        stop.set()
        pool.release_server(url)
    assert served_b == [S0]


@pytest.mark.anyio
async def test_raising_max_concurrent_wakes_waiters(pool: ServerPool) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    await dispatcher.submit("modelA")
    waiting = asyncio.ensure_future(dispatcher.submit("modelA", timeout=2))
    await queued(pool, 1)
    pool.servers[S0].max_concurrent = 2
    assert await waiting == S0
    assert pool.servers[S0].active_requests == 2


@pytest.mark.anyio
async def test_report_server_error_marks_without_releasing(pool: ServerPool) -> None:
    dispatcher = ConcurrentDispatcher(pool)
    url = await dispatcher.submit("shared")
    pool.report_server_error(url, ConnectionError("reset by peer"))
    assert pool.servers[url].active_requests == 1
    assert pool.servers[url].last_refresh_error == "reset by peer"
    other = await dispatcher.submit("shared")
    assert other != url
    pool.release_server(url)
    pool.release_server(other)
    assert all(server.active_requests == 0 for server in pool.servers.values())


# --- manifests over a real socket ------------------------------------------------------------


@pytest.mark.anyio
async def test_refresh_all_manifests_uses_keys_and_stores_errors() -> None:
    def models(request: Request) -> Reply:
        if request.headers.get("authorization") != "Bearer key-a":
            return Reply(401, {"error": "no"})
        return Reply(200, {"object": "list", "data": [{"id": "modelA"}, {"id": "modelB"}]})

    async with serve(models) as good, serve(lambda r: Reply(401)) as refusing:
        pool = ServerPool(
            [ServerConfig(url=good.url, api_key="key-a"), ServerConfig(url=refusing.url, api_key="wrong")]
        )
        pool.servers[refusing.url].available_models = ["stale"]
        await pool.refresh_all_manifests()
    assert good.requests[0].path == "/v1/models"
    assert pool.servers[good.url].available_models == ["modelA", "modelB"]
    assert pool.servers[good.url].last_refresh_error is None
    assert pool.servers[refusing.url].available_models == []
    assert pool.servers[refusing.url].last_refresh_error == "HTTP 401"
    assert pool.get_all_available_models() == {"modelA", "modelB"}


@pytest.mark.anyio
async def test_refresh_of_an_unreachable_server_never_raises() -> None:
    async with serve(lambda r: Reply(200, {"data": []})) as closed:
        url = closed.url
    pool = ServerPool([url])
    await pool.refresh_all_manifests()
    assert pool.servers[url].available_models == []
    assert pool.servers[url].last_refresh_error
