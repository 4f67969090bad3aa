from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import threading

import anyio
import anyio.lowlevel
import httpx
import pytest

from local_inference_pool import (
    BackendConfig,
    ModelNotFoundError,
    Pool,
    PoolClosedError,
    PoolConfig,
    QueueFullError,
    QueueTimeoutError,
    WrongEventLoopError,
)
from local_inference_pool.core.scheduler import Health

from ..clock import Clock

pytestmark = pytest.mark.anyio


def config(*backends: BackendConfig, **pool: object) -> PoolConfig:
    return PoolConfig(backends=backends, **pool)  # type: ignore[arg-type]


def one_slot(**pool: object) -> PoolConfig:
    return config(BackendConfig(url="http://gpu0:8080", slots=1, models=("m",), api_key="sk-b0"), **pool)


def active(pool: Pool) -> int:
    return int(pool.snapshot()["active_leases"])


async def wait_until_queued(pool: Pool, count: int) -> None:
    with anyio.fail_after(2):
        while pool.scheduler.waiting < count:
            await anyio.lowlevel.checkpoint()


async def test_acquire_returns_a_lease_and_release_is_idempotent() -> None:
    pool = Pool(one_slot(), clock=lambda: 5.0)
    lease = await pool.acquire("m")
    assert (lease.url, lease.backend, lease.model, lease.api_key) == (
        "http://gpu0:8080",
        "gpu0:8080",
        "m",
        "sk-b0",
    )
    assert lease.queue_wait == 0.0
    assert active(pool) == 1
    lease.release()
    lease.release()
    assert lease.released
    assert active(pool) == 0


async def test_async_with_releases_on_error() -> None:
    pool = Pool(one_slot())
    with pytest.raises(RuntimeError, match="boom"):
        async with pool.acquire("m"):
            raise RuntimeError("boom")
    assert active(pool) == 0


async def test_waiter_gets_the_slot_when_it_is_released() -> None:
    pool = Pool(one_slot())
    first = await pool.acquire("m")
    got: list[str] = []

    async def second() -> None:
        async with pool.acquire("m") as lease:
            got.append(lease.backend)
            assert lease.queue_wait > 0

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await wait_until_queued(pool, 1)
        await anyio.sleep(0.01)
        first.release()
    assert got == ["gpu0:8080"]
    assert active(pool) == 0


async def test_timeout_names_the_model_and_the_wait() -> None:
    pool = Pool(one_slot(queue_timeout=0.05))
    held = await pool.acquire("m")
    with pytest.raises(QueueTimeoutError, match=r"'m' within 0\.\ds") as caught:
        await pool.acquire("m")
    assert caught.value.waited >= 0.05
    with pytest.raises(QueueTimeoutError):
        await pool.acquire("m", timeout=0.01)
    held.release()
    assert active(pool) == 0
    assert pool.scheduler.waiting == 0


async def test_errors_are_raised_at_once() -> None:
    pool = Pool(one_slot(queue_limit=0))
    with pytest.raises(ModelNotFoundError):
        await pool.acquire("unknown")
    held = await pool.acquire("m")
    with pytest.raises(QueueFullError):
        await pool.acquire("m")
    held.release()


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    pool = Pool(one_slot())
    held = await pool.acquire("m")
    with anyio.move_on_after(0.02):
        await pool.acquire("m", timeout=None)
    assert pool.scheduler.waiting == 0
    held.release()
    assert active(pool) == 0


async def test_grant_that_races_with_cancellation_is_passed_on() -> None:
    """The slot is granted to A, then A's task is cancelled before it resumes: B must get the slot."""
    pool = Pool(one_slot())
    held = await pool.acquire("m")
    got: list[str] = []

    async def waiter(name: str) -> None:
        async with pool.acquire("m"):
            got.append(name)

    task_a = asyncio.ensure_future(waiter("A"))
    await wait_until_queued(pool, 1)
    task_b = asyncio.ensure_future(waiter("B"))
    await wait_until_queued(pool, 2)
    held.release()  # grants A synchronously; A has not resumed yet
    assert pool.scheduler.waiting == 1
    task_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task_a
    await task_b
    assert got == ["B"]
    assert active(pool) == 0
    assert pool.scheduler.stats["granted"] == 3


async def test_anyio_cancel_after_grant_lets_the_holder_finish_and_release() -> None:
    """anyio does not interrupt a wait whose result is already in; either way nothing leaks."""
    pool = Pool(one_slot())
    held = await pool.acquire("m")
    got: list[str] = []
    scope = anyio.CancelScope()

    async def waiter_a() -> None:
        with scope:
            async with pool.acquire("m"):
                got.append("A")
                await anyio.sleep(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter_a)
        await wait_until_queued(pool, 1)
        held.release()
        scope.cancel()
    assert active(pool) == 0


async def test_wait_for_race_on_every_timing_never_leaks() -> None:
    """asyncio.wait_for on 3.11 may drop a result that raced its timeout; the slot must survive."""
    pool = Pool(config(BackendConfig(url="http://gpu0:8080", slots=2, models=("m",))))
    rng = random.Random(7)
    held: list[object] = []

    async def worker() -> None:
        for _ in range(40):
            try:
                lease = await asyncio.wait_for(pool.acquire("m", timeout=None), rng.choice([0, 1e-4, 1e-3]))
            except TimeoutError:
                continue
            await asyncio.sleep(rng.choice([0, 0, 1e-4]))
            lease.release()

    await asyncio.gather(*(worker() for _ in range(8)))
    del held
    gc.collect()
    await asyncio.sleep(0)
    assert pool.scheduler.waiting == 0
    assert active(pool) == 0


async def test_dropped_lease_is_released_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    pool = Pool(one_slot())
    caplog.set_level(logging.WARNING, logger="local_inference_pool.pool.leases")
    await pool.acquire("m")  # result dropped on the floor
    gc.collect()
    await anyio.lowlevel.checkpoint()
    assert active(pool) == 0
    assert "dropped without release()" in caplog.text


async def test_lease_collected_inside_a_scheduler_call_is_released_afterwards() -> None:
    """The cyclic GC can finalize a dropped lease mid-dispatch; the release must wait for the loop."""
    pool = Pool(one_slot())
    lease = await pool.acquire("m")
    grant = lease._grant
    finalizer = lease._finalizer
    del lease
    finalizer()  # as if the collector ran now, inside whatever the loop was doing
    assert not grant.released  # nothing touched the scheduler synchronously
    await anyio.lowlevel.checkpoint()
    assert grant.released
    assert active(pool) == 0


async def test_release_from_another_thread_runs_on_the_loop() -> None:
    pool = Pool(one_slot())
    held = await pool.acquire("m")

    async def later() -> str:
        async with pool.acquire("m") as lease:
            return lease.backend

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        await wait_until_queued(pool, 1)
        thread = threading.Thread(target=pool.release_threadsafe, args=(held,))
        thread.start()
        thread.join()
    assert active(pool) == 0


async def test_second_event_loop_fails_clearly() -> None:
    pool = Pool(one_slot())
    held = await pool.acquire("m")
    errors: list[BaseException] = []

    def other_loop() -> None:
        try:
            asyncio.run(pool.acquire("m", timeout=0.1).__aenter__())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_loop)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], WrongEventLoopError)
    assert "one Pool per event loop" in str(errors[0])
    held.release()


async def test_aclose_fails_waiters_refuses_new_work_and_waits_for_leases() -> None:
    pool = Pool(one_slot())
    held = await pool.acquire("m")
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.acquire("m")
        except PoolClosedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_until_queued(pool, 1)

        async def release_soon() -> None:
            await anyio.sleep(0.02)
            held.release()

        tg.start_soon(release_soon)
        await pool.aclose(grace=2.0)
        assert active(pool) == 0
    assert len(outcome) == 1
    with pytest.raises(PoolClosedError):
        await pool.acquire("m")


async def test_update_backend_wakes_waiters_and_config_wins_over_detection() -> None:
    pool = Pool(config(BackendConfig(url="http://gpu0:8080", models=("m",))))  # slots: detect
    first = await pool.acquire("m")

    async def second() -> None:
        async with pool.acquire("m"):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await wait_until_queued(pool, 1)
        pool.update_backend("gpu0:8080", slots=4, models=["ignored"])  # detected slots apply
    assert pool.scheduler.backends["gpu0:8080"].slots == 4
    assert pool.scheduler.backends["gpu0:8080"].models == frozenset({"m"})  # configured models win
    first.release()


async def test_priority_and_session_reach_the_scheduler() -> None:
    pool = Pool(
        config(
            BackendConfig(url="http://a:1", slots=1, models=("m",)),
            BackendConfig(url="http://b:1", slots=1, models=("m",)),
        )
    )
    first = await pool.acquire("m", session="s1")
    first.release()
    again = await pool.acquire("m", session="s1")
    assert again.affinity is not None
    assert again.affinity.value == "hit"
    again.release()


def models_transport(answers: dict[str, httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[request.url.host]

    return httpx.MockTransport(handler)


async def test_refresh_models_discovers_and_keeps_models_on_a_failed_probe() -> None:
    pool = Pool(
        config(
            BackendConfig(url="http://a:1", slots=1, api_key="key-a"),
            BackendConfig(url="http://b:1", slots=1),
        )
    )
    seen: list[httpx.Request] = []
    answers = {
        "a": httpx.Response(200, json={"data": [{"id": "m"}, {"id": "x"}]}),
        "b": httpx.Response(200, json={"object": "list", "data": None}),
    }
    async with httpx.AsyncClient(transport=models_transport(answers, seen)) as client:
        errors = await pool.refresh_models(client)
        assert errors == {"a:1": None, "b:1": None}
        assert pool.scheduler.backends["a:1"].models == frozenset({"m", "x"})
        assert pool.scheduler.backends["b:1"].models == frozenset()
        assert {r.url.host: r.headers.get("authorization") for r in seen} == {"a": "Bearer key-a", "b": None}
        answers["a"] = httpx.Response(503)
        errors = await pool.refresh_models(client)
    assert errors["a:1"] == "HTTP 503"
    assert pool.scheduler.backends["a:1"].models == frozenset({"m", "x"})


async def test_warmup_sends_one_token_through_a_slot_per_backend() -> None:
    pool = Pool(
        config(
            BackendConfig(url="http://a:1", slots=1, models=("m",), api_key="key-a"),
            BackendConfig(url="http://b:1", slots=1, models=("m",)),
            BackendConfig(url="http://c:1", slots=1, models=("other",)),
        )
    )
    bodies: list[tuple[str, dict[str, object], str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((request.url.host, json.loads(request.content), request.headers.get("authorization")))
        assert pool.scheduler.backends[f"{request.url.host}:1"].active_total == 1  # inside a slot
        return httpx.Response(200, json={"choices": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        results = await pool.warmup("m", backends=5, client=client)
    assert results == {"a:1": None, "b:1": None}
    assert sorted(host for host, _, _ in bodies) == ["a", "b"]
    assert all(body["max_tokens"] == 1 and body["model"] == "m" for _, body, _ in bodies)
    assert {host: auth for host, _, auth in bodies} == {"a": "Bearer key-a", "b": None}
    snapshot = {b["name"]: b for b in pool.snapshot()["backends"]}
    assert snapshot["a:1"]["warm_models"] == ["m"]
    assert snapshot["c:1"]["warm_models"] == []
    assert active(pool) == 0


async def test_warmup_reports_a_backend_error() -> None:
    pool = Pool(one_slot())
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
        assert await pool.warmup("m", client=client) == {"gpu0:8080": "HTTP 500"}
    assert active(pool) == 0


async def test_snapshot_is_json_ready() -> None:
    pool = Pool(one_slot())
    async with pool.acquire("m"):
        snap = pool.snapshot()
    json.dumps(snap)
    (backend,) = snap["backends"]
    assert backend["kind"] == "auto"
    assert backend["active_by_model"] == {"m": 1}
    assert snap["closed"] is False


async def test_health_changes_flow_through_the_pool() -> None:
    pool = Pool(one_slot())
    pool.update_backend("gpu0:8080", health=Health.LOADING)
    got: list[str] = []

    async def waiter() -> None:
        async with pool.acquire("m") as lease:
            got.append(lease.backend)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_until_queued(pool, 1)
        pool.update_backend("gpu0:8080", health=Health.HEALTHY)
    assert got == ["gpu0:8080"]


DOCUMENT = "".join(
    f"Section {i} of the shared handbook, long enough to be worth a cache. " for i in range(60)
)


def cache_fleet(**pool: object) -> PoolConfig:
    return config(
        BackendConfig(url="http://gpu0:8080", name="b0", slots=1, models=("m",)),
        BackendConfig(url="http://gpu1:8080", name="b1", slots=1, models=("m",)),
        **pool,
    )


async def test_a_held_waiter_wakes_when_its_hold_runs_out_and_takes_the_free_slot() -> None:
    from local_inference_pool.core.prompt_index import prompt_of
    from local_inference_pool.core.scheduler import Affinity

    pool = Pool(cache_fleet(cache_wait_max=0.2))
    document = prompt_of([DOCUMENT, "first"], model="m")
    holder = await pool.acquire("m", prompt=document)
    assert holder.backend == "b0"
    holder.learn(prompt_tokens=1000, cached_tokens=0, prefill_seconds=2.0, evaluated_tokens=1000)
    other = await pool.acquire("m")
    assert other.backend == "b1"
    got: list[object] = []
    done = anyio.Event()
    async with anyio.create_task_group() as group:

        async def turn() -> None:
            lease = await pool.acquire("m", prompt=prompt_of([DOCUMENT, "second"], model="m"))
            got.append((lease.backend, lease.affinity))
            lease.release()
            done.set()

        group.start_soon(turn)
        await wait_until_queued(pool, 1)
        other.release()  # b1 frees: the turn holds out for b0's cache, for at most 0.2 s
        assert pool.snapshot()["backends"][0]["held_for_cache"] == 1
        with anyio.fail_after(5):  # the pool's own timer ends the hold: nothing here moves it
            await done.wait()
    assert got == [("b1", Affinity.MOVED)]  # b0 never freed: its hold ran out, it moved
    holder.release()
    assert active(pool) == 0
    assert pool.snapshot()["prompt_cache"][0]["moved"] == 1


async def test_a_held_waiter_cancelled_leaves_nothing_behind() -> None:
    from local_inference_pool.core.prompt_index import prompt_of

    pool = Pool(cache_fleet())
    holder = await pool.acquire("m", prompt=prompt_of([DOCUMENT, "first"], model="m"))
    holder.learn(prompt_tokens=1000, cached_tokens=0, prefill_seconds=2.0, evaluated_tokens=1000)
    other = await pool.acquire("m")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def turn() -> None:
                await pool.acquire("m", prompt=prompt_of([DOCUMENT, "second"], model="m"))

            group.start_soon(turn)
            await wait_until_queued(pool, 1)
            other.release()
            assert pool.snapshot()["backends"][0]["held_for_cache"] == 1
            scope.cancel()
    assert pool.scheduler.waiting == 0
    assert pool.snapshot()["backends"][0]["held_for_cache"] == 0
    holder.release()
    assert active(pool) == 0


def test_a_probe_that_began_before_the_pools_own_load_does_not_undo_it() -> None:
    clock = Clock()
    pool = Pool(
        config(BackendConfig(url="http://a:1", name="a", models=("m", "n"), max_loaded_models=2)), clock=clock
    )
    pool.update_backend("a", resident=["n"])
    probe_began = clock()
    clock.advance(1)
    pool.placing.set_resident("a", add="m")
    pool.update_backend("a", resident=["n"], probed_at=probe_began)  # it read the server before the load
    assert pool.scheduler.backends["a"].resident == ["m", "n"]
    clock.advance(1)
    pool.update_backend("a", resident=["m"], probed_at=clock())  # a later probe is the truth
    assert pool.scheduler.backends["a"].resident == ["m"]
