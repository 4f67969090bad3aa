"""Removing a backend while leases on it still run: they stay valid and counted fleet-wide until
released, and nothing else of the backend is kept."""

from __future__ import annotations

import anyio
import pytest

from local_inference_pool import BackendConfig, Pool, PoolConfig

from ..redis_store import Store

pytestmark = pytest.mark.anyio

A = BackendConfig(url="http://a:8080", name="a", slots=2, models=("m",))
B = BackendConfig(url="http://b:8080", name="b", slots=2, models=("m",))


async def test_a_lease_on_a_removed_backend_is_still_renewed_for_the_fleet(store: Store) -> None:
    config = PoolConfig(backends=(A, B), state=store.url, lease_ttl=1.0)
    async with Pool(config) as pool:
        lease = await pool.acquire("m")
        gone = lease.backend
        pool.remove_backend(gone)
        with anyio.fail_after(5):  # renewed every third of the ttl: past three ttls it still counts
            for _ in range(3):
                await anyio.sleep(config.lease_ttl)
                assert store.leases(gone) == 1
        lease.release()
        with anyio.fail_after(5):
            while store.leases(gone):
                await anyio.sleep(0.02)


async def test_nothing_of_a_removed_backend_comes_back_with_a_new_one_of_its_name() -> None:
    pool = Pool(PoolConfig(backends=(A, B)))
    lease = await pool.acquire("m")
    lease.learn(prompt_tokens=100, cached_tokens=50)
    pool.annotate(lease.backend, last_error="it broke")
    pool.backends.note_warm(lease.backend, "m", 1.0)
    name = lease.backend
    pool.remove_backend(name)
    pool.annotate(name, detected_kind="llamacpp")  # a probe that ends after the removal adds nothing
    lease.release()  # harmless after the removal
    assert pool.scheduler.grants == {}
    pool.add_backend(A if name == "a" else B)
    shown = next(b for b in pool.snapshot()["backends"] if b["name"] == name)
    assert shown["granted"] == 0
    assert shown["warm_models"] == []
    assert "last_error" not in shown
    assert "detected_kind" not in shown
    assert all(entry["backend"] != name for entry in pool.snapshot()["prompt_cache"])
