"""A long-running pool does not grow per request: what it keeps is bounded by what runs and waits."""

from __future__ import annotations

import pytest

from local_inference_pool import BackendConfig, Pool, PoolConfig

pytestmark = pytest.mark.anyio


async def test_ten_thousand_leases_with_a_queue_timeout_leave_no_entry_behind() -> None:
    backend = BackendConfig(url="http://a:8080", name="a", slots=2, models=("m",))
    pool = Pool(PoolConfig(backends=(backend,), queue_timeout=600))  # as the README suggests
    for index in range(10_000):
        async with pool.acquire("m", session=f"s{index % 10}", tenant=f"caller-{index}"):
            pass
    sizes = pool.scheduler.index_sizes()
    assert sizes["deadlines"] <= 64, sizes
    assert sizes["arrivals"] <= 64, sizes
    assert sizes["tenants"] == 1, sizes  # the default tenant; made-up names are not kept
    assert sizes["sessions"] == 10
    assert sizes["grants"] == 0
    assert not pool._waiters
