"""A pool belongs to one event loop; a release from any thread reaches it, and is never lost."""

from __future__ import annotations

import asyncio
import threading

from local_inference_pool import BackendConfig, Pool, PoolConfig

CONFIG = PoolConfig(backends=(BackendConfig(url="http://a:8080", name="a", slots=1, models=("m",)),))


def test_a_release_from_a_thread_while_the_loop_is_stopped_is_not_lost() -> None:
    pool = Pool(CONFIG)
    loop = asyncio.new_event_loop()
    try:
        lease = loop.run_until_complete(pool.acquire("m"))  # the loop stops, and is not closed
        assert not loop.is_running()
        assert not loop.is_closed()
        worker = threading.Thread(target=lease.release)
        worker.start()
        worker.join(5)
        assert not pool.scheduler.grants  # released now: a callback queued on the stopped loop
        assert pool.scheduler.backends["a"].active_total == 0  # would run only if it ran again
    finally:
        loop.close()


def test_a_release_from_a_thread_while_the_loop_runs_is_made_on_the_loop() -> None:
    async def main() -> None:
        pool = Pool(CONFIG)
        lease = await pool.acquire("m")
        waiter = asyncio.ensure_future(pool.acquire("m"))
        await asyncio.sleep(0)  # queued behind the lease
        released_on: list[int] = []
        original = pool.scheduler.release

        def recording(grant: object) -> bool:
            released_on.append(threading.get_ident())
            return original(grant)  # type: ignore[arg-type]

        pool.scheduler.release = recording  # type: ignore[method-assign]
        await asyncio.to_thread(lease.release)
        second = await asyncio.wait_for(waiter, 5)  # the waiter is woken by the release
        assert released_on == [threading.get_ident()]  # on the loop's thread, not the worker's
        second.release()

    asyncio.run(main())
