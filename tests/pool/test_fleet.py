"""Several pools, one fleet: leases shared through a real redis-server (each test starts its own on a
free loopback port, persistence off, and stops it). The store's own counts are checked, not the pools'."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.abc
import pytest
import redis
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import generate_latest

from local_inference_pool import BackendConfig, Pool, PoolConfig
from local_inference_pool.core.scheduler import Affinity
from local_inference_pool.errors import StateUnavailableError
from local_inference_pool.gateway.metrics import PoolMetrics
from local_inference_pool.gateway.responses import ResponseMemory
from local_inference_pool.pool import Lease

from ..redis_store import Store

pytestmark = pytest.mark.anyio

SLOTS = 3


def config(store: Store, **pool: object) -> PoolConfig:
    backend = BackendConfig(
        url="http://a:8080", name="a", slots=SLOTS, models=("m", "x"), max_loaded_models=1
    )
    return PoolConfig(backends=(backend,), state=store.url, **{"lease_ttl": 30.0, **pool})  # type: ignore[arg-type]


async def queued_in_the_fleet(store: Store, model: str) -> None:
    """Until a process has published a waiting request for ``model`` as its queue head: it was
    placed, refused or not claimed, and waits, as the fleet sees it."""
    with anyio.fail_after(5):
        while not store.queue(model):
            await anyio.sleep(0.01)


@asynccontextmanager
async def pools(store: Store, count: int, **settings: object) -> AsyncIterator[list[Pool]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Pool(config(store, **settings))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
async def test_no_backend_ever_has_more_leases_than_slots_or_two_models_across_pools(
    store: Store, seed: int
) -> None:
    rng = random.Random(seed)
    held: list[Lease] = []
    async with pools(store, 3) as fleet, anyio.create_task_group() as group:
        waiting: list[anyio.CancelScope] = []

        async def acquire(pool: Pool, model: str, scope: anyio.CancelScope) -> None:
            with scope:
                held.append(await pool.acquire(model, timeout=None))

        for _step in range(60):
            action = rng.random()
            if action < 0.5:
                scope = anyio.CancelScope()
                waiting.append(scope)
                group.start_soon(acquire, rng.choice(fleet), rng.choice(["m", "m", "x"]), scope)
            elif action < 0.85 and held:
                held.pop(rng.randrange(len(held))).release()
            elif waiting:
                waiting.pop(rng.randrange(len(waiting))).cancel()  # a client that gave up
            for _ in range(20):  # let claims, releases and wake-ups run
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.005)
            assert store.leases() <= SLOTS
            assert len(store.models()) <= 1
            assert len([lease for lease in held if not lease.released]) <= SLOTS
        for scope in waiting:
            scope.cancel()
        while held:
            held.pop().release()
        with anyio.fail_after(5):
            while store.leases():
                await anyio.sleep(0.02)
    assert store.models() == {}


async def test_a_model_active_in_one_pool_holds_another_model_back_in_another(store: Store) -> None:
    async with pools(store, 2) as (first, second):
        lease = await first.acquire("m")
        got: list[Lease] = []

        async def other_model() -> None:
            got.append(await second.acquire("x", timeout=None))

        async with anyio.create_task_group() as group:
            group.start_soon(other_model)
            await queued_in_the_fleet(store, "x")
            assert got == []  # a slot is free, but the backend is busy with model m
            assert store.models() == {"m": 1}
            lease.release()
        assert store.models() == {"x": 1}
        got[0].release()


async def test_a_release_in_one_pool_wakes_a_waiter_in_another_without_polling(store: Store) -> None:
    async with pools(store, 2) as (first, second):  # lease_ttl 30 s: the next renewal is 10 s away
        leases = [await first.acquire("m") for _ in range(SLOTS)]
        got: list[Lease] = []
        ready = anyio.Event()

        async def wait_for_one() -> None:
            got.append(await second.acquire("m", timeout=None))
            ready.set()

        async with anyio.create_task_group() as group:
            group.start_soon(wait_for_one)
            await queued_in_the_fleet(store, "m")
            assert got == []
            leases.pop().release()
            with anyio.fail_after(2):  # a notification, not the renewal pass
                await ready.wait()
        assert store.leases() == SLOTS
        for lease in [*leases, *got]:
            lease.release()


async def test_a_quiet_fleet_keeps_its_subscriptions_and_still_hears_a_release(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Notices come on a connection with no read timeout: five times the store's 2 s timeout of
    quiet (some redis-py releases end a subscription that reads nothing for that long) ends no
    subscription, and the next release is heard at once."""
    caplog.set_level(logging.WARNING)
    async with pools(store, 2) as (first, second):
        held = [await first.acquire("m") for _ in range(SLOTS)]
        with anyio.fail_after(5):
            while len(store.subscriptions()) < 2:
                await anyio.sleep(0.05)
        waiting = second.acquire("m", timeout=None)
        assert waiting.at_once() is None
        await anyio.sleep(10)  # quiet: no release, no queue change, only renewals
        assert all(age >= 10 for age in store.subscriptions()), store.subscriptions()
        assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
        held.pop().release()
        with anyio.fail_after(1):
            lease = await waiting
        for one in [lease, *held]:
            one.release()


HOLDER = textwrap.dedent(
    """
    import anyio, sys
    from local_inference_pool import BackendConfig, Pool, PoolConfig

    async def main() -> None:
        backend = BackendConfig(url="http://a:8080", name="a", slots=3, models=("m", "x"), max_loaded_models=1)
        async with Pool(PoolConfig(backends=(backend,), state=sys.argv[1], lease_ttl=1.0)) as pool:
            leases = [await pool.acquire("m") for _ in range(3)]

            async def wait() -> None:
                await pool.acquire("m", timeout=None)  # the head of this process's queue

            async with anyio.create_task_group() as group:
                if "wait" in sys.argv:
                    group.start_soon(wait)
                    while pool.scheduler.waiting < 1:
                        await anyio.sleep(0.01)
                print("holding", len(leases), flush=True)
                await anyio.sleep_forever()

    anyio.run(main)
    """
)


@asynccontextmanager
async def holder(store: Store, *, waiting: bool = False) -> AsyncIterator[anyio.abc.Process]:
    """A process holding every slot (and, ``waiting``, one request queued behind them), until the
    block sends it SIGKILL; killed on the way out whatever happens."""
    process = await anyio.open_process(
        [sys.executable, "-c", HOLDER, store.url, *(["wait"] if waiting else [])]
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(10):
            assert b"holding 3" in await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1000)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_leases_of_a_process_killed_with_sigkill_come_back_within_lease_ttl(store: Store) -> None:
    async with holder(store) as process:
        assert store.leases() == SLOTS
        process.send_signal(signal.SIGKILL)
        await process.wait()
    async with pools(store, 1) as (survivor,):
        with anyio.fail_after(5):  # lease_ttl 1 s: expired on the next claim after it
            lease = await survivor.acquire("m", timeout=None)
        lease.release()


async def test_live_leases_are_renewed_and_never_expire(store: Store) -> None:
    async with pools(store, 1, lease_ttl=0.6) as (pool,):
        lease = await pool.acquire("m")
        await anyio.sleep(2.0)  # three times the ttl: renewed every 0.2 s
        assert store.leases() == 1
        lease.release()


async def test_without_the_store_new_work_fails_closed_and_comes_back_with_it(store: Store) -> None:
    async with pools(store, 1, lease_ttl=1.5) as (pool,):
        held = await pool.acquire("m")
        store.stop()
        with anyio.fail_after(5), pytest.raises(StateUnavailableError):  # never a hang
            await pool.acquire("m")
        held.release()  # in flight when the store went: released here, sent when it is back
        assert not pool.scheduler.grants
        store.start()  # an empty store: no persistence
        with anyio.fail_after(10):
            while True:
                try:
                    lease = await pool.acquire("m")
                    break
                except StateUnavailableError:
                    await anyio.sleep(0.2)
        with anyio.fail_after(5):
            while store.leases() != 1:  # the earlier lease, re-asserted by renewal, is released
                await anyio.sleep(0.05)
        lease.release()
        with anyio.fail_after(5):
            while store.leases():
                await anyio.sleep(0.05)


async def test_busy_slots_a_server_reports_for_other_pools_are_not_counted_twice(store: Store) -> None:
    async with pools(store, 2) as (first, second):
        theirs = [await first.acquire("m") for _ in range(SLOTS - 1)]
        # The server's own count of busy slots (llama.cpp's /slots), as a probe of `second` sees it:
        # the other pool's requests, which the store already counts.
        second.update_backend("a", server_busy=SLOTS - 1)
        with anyio.fail_after(2):
            mine = await second.acquire("m")  # the last slot is free
        assert store.leases() == SLOTS
        for lease in [*theirs, mine]:
            lease.release()


async def test_two_v07_programs_on_one_store_share_the_drain_guard(store: Store) -> None:
    from local_inference_pool.compat import ConcurrentDispatcher, ServerPool

    url = "http://gpu:1234"

    def program() -> ServerPool:
        pool = ServerPool([url], config=PoolConfig(state=store.url))
        pool.servers[url].available_models = ["model-a", "model-b"]
        return pool

    async with program() as first, program() as second:
        held = await ConcurrentDispatcher(first).submit("model-a")
        other = asyncio.ensure_future(ConcurrentDispatcher(second).submit("model-b", timeout=10))
        await queued_in_the_fleet(store, "model-b")
        assert not other.done()  # the server is busy with model-a in the other program
        first.release_server(held)
        with anyio.fail_after(5):
            assert await other == url
        second.release_server(url)
        with pytest.raises(RuntimeError, match="synchronously"):  # it would bypass the store
            first.find_and_acquire("model-a")


async def queued(store: Store, model: str, processes: int) -> None:
    """Until the fleet's queue for ``model`` holds a head from ``processes`` processes."""
    with anyio.fail_after(5):
        while len(store.queue(model)) < processes:
            await anyio.sleep(0.01)


async def test_a_freed_slot_goes_to_the_earliest_waiter_of_the_fleet_not_of_its_process(
    store: Store,
) -> None:
    async with pools(store, 2) as (first, second), anyio.create_task_group() as group:
        held = [await first.acquire("m") for _ in range(SLOTS)]
        order: list[str] = []

        async def wait(pool: Pool, name: str) -> None:
            lease = await pool.acquire("m", timeout=None)
            order.append(name)
            held.append(lease)

        group.start_soon(wait, second, "second's, earlier")
        await queued(store, "m", 1)
        group.start_soon(wait, first, "first's, later")
        await queued(store, "m", 2)
        held.pop(0).release()  # in the process of the later waiter: it must still go to the earlier
        with anyio.fail_after(5):
            while not order:
                await anyio.sleep(0.01)
        assert order == ["second's, earlier"]
        held.pop(0).release()
        with anyio.fail_after(5):
            while len(order) < 2:
                await anyio.sleep(0.01)
        assert order == ["second's, earlier", "first's, later"]
        for lease in held:
            lease.release()
    exposition = generate_latest(PoolMetrics(first).registry).decode()
    assert 'lip_state_claims_total{outcome="won"}' in exposition
    assert "lip_backend_fleet_reserved" in exposition


async def test_a_process_with_many_waiters_does_not_starve_one_with_few(store: Store) -> None:
    async with pools(store, 2) as (crowd, single), anyio.create_task_group() as group:
        held = [await crowd.acquire("m") for _ in range(SLOTS)]
        order: list[str] = []

        async def wait(pool: Pool, name: str) -> None:
            lease = await pool.acquire("m", timeout=None)
            order.append(name)
            lease.release()  # at once: the next one in the fleet's order gets the slot

        for number in range(4):
            group.start_soon(wait, crowd, f"crowd {number}")
            with anyio.fail_after(5):
                while crowd.scheduler.waiting < number + 1:
                    await anyio.sleep(0.01)
        await queued(store, "m", 1)
        group.start_soon(wait, single, "single")
        await queued(store, "m", 2)
        for number in range(4, 8):
            group.start_soon(wait, crowd, f"crowd {number}")
        with anyio.fail_after(5):
            while crowd.scheduler.waiting < 8:
                await anyio.sleep(0.01)
        lease = held.pop()
        lease.release()
        with anyio.fail_after(10):
            while len(order) < 9:
                await anyio.sleep(0.01)
        assert order.index("single") <= 4, order  # after the 4 that came before it, not after all 8
        for lease in held:
            lease.release()


async def test_batching_by_model_holds_fleet_wide_until_a_waiter_starves(store: Store) -> None:
    # One slot, one model at a time. A stream of requests for m in one process keeps the backend
    # on m; a request for x in the other waits (no swap for it) until it starves, then the backend
    # drains and serves it.
    async with pools(store, 2, starvation_bound=0.5) as (busy, other):
        stop = anyio.Event()
        served_m = 0

        async def stream_of_m() -> None:
            nonlocal served_m
            while not stop.is_set():
                async with busy.acquire("m", timeout=None):
                    served_m += 1
                    await anyio.sleep(0.02)

        async with anyio.create_task_group() as group:
            for _ in range(SLOTS + 1):
                group.start_soon(stream_of_m)
            with anyio.fail_after(5):
                while served_m < SLOTS:
                    await anyio.sleep(0.01)
            started = anyio.current_time()
            with anyio.fail_after(10):
                lease = await other.acquire("x", timeout=None)
            waited = anyio.current_time() - started
            assert store.models() == {"x": 1}  # the backend drained for it
            assert served_m > SLOTS  # m kept being served meanwhile: no swap before it starved
            assert waited >= 0.4, waited
            lease.release()
            stop.set()


async def test_a_session_goes_back_to_its_backend_from_another_process(store: Store) -> None:
    backends = tuple(
        BackendConfig(url=f"http://{name}:8080", name=name, slots=1, models=("m",)) for name in "ab"
    )
    settings = PoolConfig(backends=backends, state=store.url)
    async with Pool(settings) as first, Pool(settings) as second:
        blocker = await first.acquire("m")  # on a: the session's first turn goes to b
        turn = await first.acquire("m", session="conversation-1")
        assert (blocker.backend, turn.backend) == ("a", "b")
        blocker.release()
        turn.release()
        with anyio.fail_after(5):
            while store.leases("a") or store.leases("b"):
                await anyio.sleep(0.01)
        # The next turn lands on the other process, where both backends are idle and a is first.
        next_turn = await second.acquire("m", session="conversation-1")
        assert next_turn.backend == "b"
        assert next_turn.affinity is Affinity.HIT
        next_turn.release()


async def test_the_queue_head_of_a_process_killed_with_sigkill_stops_holding_slots(store: Store) -> None:
    async with holder(store, waiting=True) as process:
        await queued(store, "m", 1)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    async with pools(store, 1) as (survivor,):
        with anyio.fail_after(5):  # lease_ttl 1 s: its leases and its waiting head expire
            leases = [await survivor.acquire("m", timeout=None) for _ in range(SLOTS)]
        assert store.queue("m") == {}
        for lease in leases:
            lease.release()


async def test_scripts_the_store_lost_are_loaded_again_for_a_batch(store: Store) -> None:
    from local_inference_pool.core.fleet import Standing
    from local_inference_pool.pool.redis_state import SharedLeases

    shared = SharedLeases(store.url, lease_ttl=30.0)
    standing = Standing(capacity=2, max_models=1, models=("m",))
    try:
        await shared.view({"a": standing})  # the script is loaded
        redis.Redis(port=store.port).script_flush()  # as after a restart of the store
        views = await shared.view({"a": standing, "b": standing})  # a batch of two
        assert views["a"].leases == views["b"].leases == 0
    finally:
        await shared.aclose()


async def test_across_the_fleet_a_higher_priority_goes_first_even_when_it_came_later(store: Store) -> None:
    async with pools(store, 2) as (first, second), anyio.create_task_group() as group:
        held = [await first.acquire("m") for _ in range(SLOTS)]
        order: list[str] = []

        async def wait(pool: Pool, name: str, priority: int) -> None:
            lease = await pool.acquire("m", priority=priority, timeout=None)
            order.append(name)
            held.append(lease)

        group.start_soon(wait, first, "earlier, priority 0", 0)
        await queued(store, "m", 1)
        group.start_soon(wait, second, "later, priority 5", 5)
        await queued(store, "m", 2)
        held.pop(0).release()  # in the process of the earlier, lower priority
        with anyio.fail_after(5):
            while not order:
                await anyio.sleep(0.01)
        assert order == ["later, priority 5"]
        for lease in held:
            lease.release()


async def test_the_backend_that_stores_a_response_is_known_to_every_process(store: Store) -> None:
    async with pools(store, 2) as (first, second):
        made_here, elsewhere = ResponseMemory(first.config, first), ResponseMemory(second.config, second)
        await made_here.remember("resp_fleet_1", "a")
        assert await elsewhere.backend_of("resp_fleet_1") == "a"  # made through another process
        assert await elsewhere.backend_of("resp_never") is None
        assert len(elsewhere) == 0  # another process's ids are read from the store, not copied


def capped(store: Store, cap: int = 2) -> PoolConfig:
    from local_inference_pool.config import KeyConfig

    backend = BackendConfig(url="http://a:8080", name="a", slots=5, models=("m",))
    keys = (KeyConfig(name="team", key="sk-team", max_concurrent=cap),)
    return PoolConfig(backends=(backend,), state=store.url, keys=keys, lease_ttl=30.0)


async def test_a_keys_max_concurrent_holds_across_processes(store: Store) -> None:
    async with Pool(capped(store)) as first, Pool(capped(store)) as second:
        held = [await first.acquire("m", tenant="team") for _ in range(2)]
        got: list[Lease] = []
        ready = anyio.Event()

        async def third_for_the_key() -> None:
            got.append(await second.acquire("m", tenant="team", timeout=None))
            ready.set()

        async with anyio.create_task_group() as group:
            group.start_soon(third_for_the_key)
            with anyio.fail_after(5):
                while second.scheduler.waiting < 1:
                    await anyio.sleep(0.01)
            others = await second.acquire("m", tenant="someone-else")  # the slots are free for others
            assert got == []
            assert store.key_leases("team") == 2
            held.pop().release()
            with anyio.fail_after(2):  # woken by the release's notice, not the renewal pass
                await ready.wait()
        assert store.key_leases("team") == 2
        for lease in [*held, *got, others]:
            lease.release()
    assert store.key_leases("team") == 0


@pytest.mark.parametrize("seed", range(3))
async def test_a_keys_cap_is_never_exceeded_under_random_load_across_three_pools(
    store: Store, seed: int
) -> None:
    rng = random.Random(seed)
    held: list[Lease] = []
    async with AsyncExitStack() as stack:
        fleet = [await stack.enter_async_context(Pool(capped(store, cap=3))) for _ in range(3)]
        group = await stack.enter_async_context(anyio.create_task_group())
        waiting: list[anyio.CancelScope] = []

        async def acquire(pool: Pool, scope: anyio.CancelScope) -> None:
            with scope:
                held.append(await pool.acquire("m", tenant="team", timeout=None))

        for _step in range(50):
            action = rng.random()
            if action < 0.55:
                scope = anyio.CancelScope()
                waiting.append(scope)
                group.start_soon(acquire, rng.choice(fleet), scope)
            elif action < 0.9 and held:
                held.pop(rng.randrange(len(held))).release()
            elif waiting:
                waiting.pop(rng.randrange(len(waiting))).cancel()
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.005)
            assert store.key_leases("team") <= 3
            assert len([lease for lease in held if not lease.released]) <= 3
        for scope in waiting:
            scope.cancel()
        while held:
            held.pop().release()
        with anyio.fail_after(5):
            while store.key_leases("team"):
                await anyio.sleep(0.02)


async def test_a_capped_keys_live_leases_are_renewed_with_the_slot(store: Store) -> None:
    from dataclasses import replace

    async with Pool(replace(capped(store), lease_ttl=0.6)) as pool:
        lease = await pool.acquire("m", tenant="team")
        await anyio.sleep(2.0)  # three times the ttl: renewed every 0.2 s
        assert store.key_leases("team") == 1
        assert store.leases() == 1
        lease.release()
    with anyio.fail_after(5):
        while store.key_leases("team"):
            await anyio.sleep(0.02)
