"""``pool.load_locks``: one change at a time per server, fleet-wide, on a real redis-server."""

from __future__ import annotations

import json

import anyio
import pytest

from local_inference_pool.errors import StateUnavailableError
from local_inference_pool.pool.load_locks import LocalLoadLocks, RedisLoadLocks

from ..redis_store import Store, free_port

pytestmark = pytest.mark.anyio


async def test_one_holder_at_a_time_and_the_others_see_what_it_does(store: Store) -> None:
    first, second = RedisLoadLocks(store.url), RedisLoadLocks(store.url)
    try:
        token = await first.acquire("r1", "m", "loading", ttl=30)
        assert token is not None
        assert await second.acquire("r1", "n", "loading", ttl=30) is None
        assert await second.changing(["r1", "r2"]) == {"r1": {"m": "loading"}}
        assert await first.changing(["r1"]) == {}  # its own change is not news to it
        await first.release("r1", token, "loaded", settle=5)
        assert await second.changing(["r1"]) == {"r1": {"m": "loaded"}}  # the result, for a while
        assert await second.acquire("r1", "n", "loading", ttl=30) is None  # nor a change meanwhile
        assert await first.changing(["r1"]) == {}
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_lock_expires_and_a_stale_holder_does_not_release_anothers(store: Store) -> None:
    first, second = RedisLoadLocks(store.url), RedisLoadLocks(store.url)
    try:
        stale = await first.acquire("r1", "m", "loading", ttl=0.05)
        assert stale is not None
        with anyio.fail_after(5):
            while (fresh := await second.acquire("r1", "n", "unloading", ttl=30)) is None:
                await anyio.sleep(0.02)  # the first holder died: its lock goes by itself
        await first.release("r1", stale, "loaded", settle=5)  # too late: not its lock any more
        assert await first.changing(["r1"]) == {"r1": {"n": "unloading"}}
        await second.release("r1", fresh, None, settle=0.05)
        assert json.loads((await first.changing(["r1"]))["r1"].__repr__().replace("'", '"')) == {
            "n": "failed"
        }
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_store_that_is_away_is_said_and_a_release_lets_the_lock_expire() -> None:
    locks = RedisLoadLocks(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        with pytest.raises(StateUnavailableError):
            await locks.acquire("r1", "m", "loading", ttl=30)
        with pytest.raises(StateUnavailableError):
            await locks.changing(["r1"])
        await locks.release(
            "r1", json.dumps({"model": "m", "state": "loading", "token": "t"}), None, settle=1
        )
    finally:
        await locks.aclose()


async def test_alone_every_lock_is_granted_and_nothing_is_seen() -> None:
    locks = LocalLoadLocks()
    token = await locks.acquire("r1", "m", "loading", ttl=30)
    assert token is not None
    assert await locks.changing(["r1"]) == {}
    await locks.release("r1", token, "loaded", settle=1)
